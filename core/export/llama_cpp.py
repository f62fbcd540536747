"""llama.cpp's own Python converters, taken from the llama-cpp-python source package.

The `llama-cpp-python` sdist carries `vendor/llama.cpp/` with `convert_hf_to_gguf.py`,
`convert_lora_to_gguf.py`, the `conversion/` package they import and `gguf-py`. They are
pure Python and run with this project's interpreter; nothing is compiled. The project does
not ship llama.cpp: the install step downloads the sdist into the cache folder

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d .cache/llama-cpp-python

and it is unpacked there on first use. `LORA_SCRIPTS_LLAMA_CPP` may point at any llama.cpp
checkout instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "llama-cpp-python"
ENV_VAR = "LORA_SCRIPTS_LLAMA_CPP"
INSTALL_HINT = ("pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: "
                "-d .cache/llama-cpp-python")
_SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")


class LlamaCppMissing(ValueError):
    """llama.cpp's converters are not available here."""


class ConverterFailed(ValueError):
    """A llama.cpp converter exited with an error; the message ends with its output."""


def _is_llama_cpp(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _SCRIPTS) and (folder / "gguf-py" / "gguf").is_dir()


def _unpack(archive: Path) -> Path | None:
    """Unpack only vendor/llama.cpp's Python parts of the sdist beside it; returns the llama.cpp folder."""
    stem = archive.name.removesuffix(".tar.gz")
    target = archive.parent / stem / "vendor" / "llama.cpp"
    if _is_llama_cpp(target):
        return target
    wanted = f"{stem}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(wanted) and (m.isfile() or m.isdir())
                   and (m.name.endswith(".py") or "/gguf-py/" in m.name or m.isdir())]
        # The C++ sources are not needed to convert; skip them (the sdist is mostly C++).
        try:
            tar.extractall(archive.parent, members=members, filter="data")
        except TypeError:  # Python before 3.11.4 has no extraction filters
            tar.extractall(archive.parent, members=members)
    return target if _is_llama_cpp(target) else None


def find_llama_cpp(cache: Path | None = None) -> Path | None:
    """The llama.cpp folder holding the converters, or None."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        folder = Path(override).expanduser()
        return folder if _is_llama_cpp(folder) else None
    cache = cache or CACHE
    if not cache.is_dir():
        return None
    for folder in sorted(cache.glob("*/vendor/llama.cpp"), reverse=True):
        if _is_llama_cpp(folder):
            return folder
    for archive in sorted(cache.glob("llama_cpp_python-*.tar.gz"), reverse=True):
        folder = _unpack(archive)
        if folder is not None:
            return folder
    return None


def require_llama_cpp() -> Path:
    folder = find_llama_cpp()
    if folder is None:
        raise LlamaCppMissing(f"llama.cpp's converters are not in {CACHE} (nor in ${ENV_VAR}). "
                              f"Get them with: {INSTALL_HINT}")
    return folder


def run_converter(script: str, args: list[str], *, folder: Path | None = None,
                  timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run one of llama.cpp's converter scripts with this interpreter; ConverterFailed with its output."""
    folder = folder or require_llama_cpp()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "gguf-py"), str(folder)])
    # Never reach the hub: the base config is always given as a local folder.
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("NO_LOCAL_GGUF", None)
    result = subprocess.run([sys.executable, str(folder / script), *args], env=env, cwd=str(folder),
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ConverterFailed(f"llama.cpp's {script} failed (exit {result.returncode}):\n{tail}")
    return result
