"""Move the tested set of libraries to the newest versions, only if the whole suite passes on them.

    python tools/update_lock.py            try the newest versions; rewrite requirements-lock.txt if green
    python tools/update_lock.py --keep     keep the trial environment (.venv-update) afterwards
    python tools/update_lock.py -- -m "not slow"   arguments after -- go to pytest

It builds a separate environment (`.venv-update`, so the app's `.venv` is untouched), installs
requirements.txt and requirements-dev.txt without the lock (so pip takes the newest versions
their ranges allow), runs the lint and the whole test suite there, and only when both pass
writes the new lock (to a temporary name, then renamed) and prints what moved. The next
`python launch.py` sees the new lock and installs it. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"
TRIAL = ROOT / ".venv-update"
HEADER = """# The tested set: every library (and what they pull in) at the version the whole suite passed with.
# launch.py installs requirements*.txt with this file as constraints (pip -c), so a new install
# gets exactly these. Rewritten by tools/update_lock.py after a green suite on the newest versions.
# torch is pinned without its build tag: the CPU build (+cpu) and the CUDA builds (+cu128) are one release.
"""


def render_lock(freeze: list[str]) -> str:
    """`pip freeze` lines -> the lock's text: exact pins only, local build tags dropped, sorted by name."""
    pins = {}
    for line in freeze:
        line = line.strip()
        if "==" not in line or line.startswith(("#", "-")):
            continue  # editable installs and comments are not part of the tested set
        name, _, version = line.partition("==")
        pins[name.strip()] = version.split("+", 1)[0].strip()
    return HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins, key=str.lower))


def read_lock(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def lock_changes(old: str, new: str) -> list[str]:
    """Readable lines for what moved between two locks."""
    before, after = read_lock(old), read_lock(new)
    lines = [f"  {name}: {before[name]} -> {after[name]}" for name in sorted(after)
             if name in before and before[name] != after[name]]
    lines += [f"  {name}: new at {after[name]}" for name in sorted(set(after) - set(before))]
    lines += [f"  {name}: no longer needed" for name in sorted(set(before) - set(after))]
    return lines


def _python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(*command: str) -> int:
    print("[update-lock] $", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep .venv-update afterwards")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    if TRIAL.exists():
        shutil.rmtree(TRIAL)
    venv.EnvBuilder(with_pip=True).create(TRIAL)
    python = str(_python(TRIAL))
    pip = (python, "-m", "pip", "install", "--disable-pip-version-check")
    try:
        if (_run(*pip, "--upgrade", "pip")
                or _run(*pip, "--upgrade", "-r", "requirements.txt", "-r", "requirements-dev.txt")
                or _run(python, "-m", "pip", "check")):
            print("[update-lock] Installing the newest versions failed; the lock is unchanged.")
            return 1
        if _run(python, "-m", "ruff", "check", ".") or _run(python, "-m", "pytest", "-q", "-p",
                                                                "no:cacheprovider", "tests", *args.pytest_args):
            print("[update-lock] The suite is not green on the newest versions; the lock is unchanged. "
                  "Fix the code (or cap the library in requirements.txt) and run this again.")
            return 1
        freeze = subprocess.run((python, "-m", "pip", "freeze"), capture_output=True, text=True, check=True)
        new = render_lock(freeze.stdout.splitlines())
        old = LOCK.read_text(encoding="utf-8") if LOCK.exists() else ""
        partial = LOCK.with_name(LOCK.name + ".partial")
        partial.write_text(new, encoding="utf-8")
        os.replace(partial, LOCK)
        moved = lock_changes(old, new)
        print("[update-lock] Green. requirements-lock.txt now pins:" if moved else
              "[update-lock] Green, and nothing moved.")
        print("\n".join(moved))
        print("[update-lock] `python launch.py` installs the new set on its next start; commit the lock.")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(TRIAL, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
