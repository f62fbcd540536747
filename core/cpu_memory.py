"""The C allocator's settings for runs on the CPU: keep the memory a step frees for the next step.

glibc's malloc serves every block over its mmap threshold (activations, gradients: megabytes each) with
a fresh `mmap` and unmaps it at `free`, and gives the top of its heap back to the kernel past a trim
threshold. A CPU training step frees all its activations, so the next step page-faults each of them in
again, zeroed by the kernel one 4 KiB page at a time: on an SD 1.5 UNet step (batch 4, 128 px, 2 threads)
0.6 to 0.9 million faults and 2 to 3 s of kernel time per step, 7.1 s a step against 4.9 s with the
blocks kept (bench/cpu_allocator.py). Intel's PyTorch guides swap in jemalloc or tcmalloc for the same
reason; glibc does it with three `mallopt` settings, so nothing is installed.

- `one_arena()` at process start (train.py, the app): every thread allocates from the main arena. A thread
  of its own (the app's run thread) otherwise gets an arena made of 64 MiB mmapped heaps that are trimmed
  with `madvise` whatever the settings below, and a thread's arena is fixed at its first allocation.
- `keeping_freed_memory()` around a run on the CPU: no mmap for big blocks and no trimming, so freed
  blocks are reused from the heap. The peak is the same (the same blocks are live at once); what is freed
  stays in the process until `give_back_freed_memory()` (`core.devices.free_memory` calls it, so the
  encoders freed before training are returned) or the block ends, which restores glibc's defaults.

Elsewhere than glibc (macOS, Windows, musl) each call does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt's parameters (malloc.h) and glibc's defaults for the ones put back.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest top of heap it will keep

_LOCK = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def one_arena() -> bool:
    """All threads allocate from the main arena (call before other threads start). False where not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, 1))


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the kernel (after freeing models: RSS falls to what is live)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def keeping_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """While the block lasts, blocks freed by one step are reused by the next without page faults.

    Yields whether the settings took effect (glibc and `enabled`). Nested and concurrent blocks share them;
    the last one out puts glibc's defaults back and trims the heap.
    """
    global _depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _LOCK:
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
