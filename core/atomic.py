"""The one way this project writes files: to a temporary name, then renamed into place.

A crash, a kill -9 or a full disk during a write leaves the previous good file (or
nothing) where the result belongs, never a half-written file. Every writer in the
project (weights, checkpoints, configs, metadata.csv, captions, images) goes through
these helpers.

The result gets the permissions a plain `open()` would give it (0o666 less the umask; folders
0o777 less the umask), or keeps those of the file it replaces: mkstemp and mkdtemp create
private (0o600 / 0o700) files, which a rename would otherwise carry into place.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Iterator

if TYPE_CHECKING:  # torch is imported only by the one writer that needs it
    import torch

COMPLETE_MARKER = ".complete"


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_usual_mode(tmp: Path, target: Path, directory: bool = False) -> None:
    """`tmp` gets the mode of the `target` it replaces, or what open()/mkdir() would have given it."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else (
            (0o777 if directory else 0o666) & ~current_umask())
        os.chmod(tmp, mode)
    except OSError:
        pass  # a file system without Unix modes (FAT, some network shares): nothing to keep


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success rename it onto `path`.

    For libraries that insist on writing to a path themselves (safetensors, torch.save,
    PIL). On any exception the temporary file is removed and `path` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists() or (tmp.stat().st_size == 0 and not _allows_empty(target)):
            # Writers that failed silently must not replace a good file with nothing.
            raise OSError(f"Nothing was written for {target}")
        _fsync_file(tmp)
        _give_usual_mode(tmp, target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> Path:
    """safetensors.save_file through a temporary name (tensors moved to the CPU, made contiguous)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def _allows_empty(target: Path) -> bool:
    # Empty caption files are legitimate; binary results never are.
    return target.suffix.lower() in {".txt", ".csv", ".log", ".json", ".yaml", ".yml", ""}


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (newlines kept exactly as given)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `path`, with a completion marker.

    Used for checkpoints: a folder without the marker was never finished and is ignored
    by `is_complete_dir`. An existing `path` is replaced only after the new one is whole.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S"), encoding="utf-8")
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        _give_usual_mode(tmp, target, directory=True)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete_dir(path: str | os.PathLike[str]) -> bool:
    """True when `path` was written whole by `atomic_dir`."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def backup_file(path: str | os.PathLike[str]) -> Path | None:
    """Copy an existing file to `<name>.bak-<timestamp>` before it is replaced.

    Returns the backup path, or None when there was nothing to back up.
    """
    source = Path(path)
    if not source.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = source.with_name(f"{source.name}.bak-{stamp}")
    counter = 1
    while backup.exists():
        backup = source.with_name(f"{source.name}.bak-{stamp}-{counter}")
        counter += 1
    atomic_write_bytes(backup, source.read_bytes())
    _give_usual_mode(backup, source)  # the backup is as private (or as shared) as the file it saves
    return backup
