"""The device: what it is (kind, name, memory, bf16, bitsandbytes), which torch device and
dtype to use, freeing its memory and recognising when it ran out.

`detect_device()` is the one call that asks the hardware for the presets; everything else
(preset choice, the memory estimate, OOM advice) takes a `DeviceInfo`, so tests simulate
any GPU by building one, or by mocking this single function.

torch is imported inside the functions that need it: validating a config and choosing a
preset's tier read this module without loading torch.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GIB = 2**30
# Lower-cased fragments of the errors CUDA, MPS and the allocators raise when memory runs out.
_OOM_TEXT = ("out of memory", "outofmemory", "cuda error: out of memory", "mps backend out of memory",
             "cublas_status_alloc_failed", "failed to allocate memory")


@dataclass(frozen=True)
class DeviceInfo:
    """One device. Memory in GiB; on MPS and CPU it is the system RAM (shared)."""

    kind: str  # cuda | mps | cpu
    name: str
    total_gb: float
    free_gb: float
    bf16: bool = False
    bitsandbytes: bool = False

    def describe(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        if self.kind == "cpu":
            return f"the CPU ({self.total_gb:.0f} GB RAM)"
        if self.kind == "mps":
            return f"Apple {self.name} ({self.total_gb:.0f} GB unified memory)"
        return f"{self.name} ({self.total_gb:.1f} GB, {self.free_gb:.1f} GB free)"


def ram_gb() -> tuple[float, float]:
    try:
        import psutil

        mem = psutil.virtual_memory()
        return mem.total / GIB, mem.available / GIB
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: a modest guess
        return 8.0, 4.0


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def detect_device(index: int | None = None) -> DeviceInfo:
    """The device training will use: CUDA GPU `index` (default: this process's LOCAL_RANK, as
    accelerate/torchrun assign it), else Apple MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        if index is None:
            rank = os.environ.get("LOCAL_RANK", "0")
            index = int(rank) if rank.isdigit() and int(rank) < torch.cuda.device_count() else 0
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo("cuda", torch.cuda.get_device_name(index), total / GIB, free / GIB,
                          bf16=bool(torch.cuda.is_bf16_supported()), bitsandbytes=has_bitsandbytes())
    total, free = ram_gb()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return DeviceInfo("mps", "Apple Silicon GPU (MPS)", total, free)
    return DeviceInfo("cpu", "CPU", total, free)


def _mps_available(torch_module: object) -> bool:
    mps = getattr(getattr(torch_module, "backends", None), "mps", None)
    return mps is not None and mps.is_available()


def pick_device(name: str | torch.device = "auto", *, mps: bool = True) -> torch.device:
    """The torch device for `name`: `auto` is CUDA when present, else Apple MPS, else the CPU.

    `mps=False` keeps `auto` to CUDA or the CPU: the text trainer and the previews have only
    ever run there (their fp16/bf16 paths are CUDA's). Any other name ('cpu', 'cuda:1', 'mps')
    goes to torch; ValueError says why one cannot be used.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    key = (name or "auto").strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps and _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if key.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is visible to PyTorch. Use --device cpu, "
                         "or install the CUDA build of torch.")
    try:
        return torch.device(key)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a device torch knows (try auto, cpu, cuda, "
                         "cuda:1, mps).") from exc


def run_precision(mixed_precision: str) -> str:
    """The precision a run trains in for the config's `mixed_precision`: fp16 needs CUDA (fp32, "no", without it)."""
    import torch

    return "no" if mixed_precision == "fp16" and not torch.cuda.is_available() else mixed_precision


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype of a precision name: 'fp16' and 'bf16' as named; 'fp32', 'no' and the rest float32."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


_FROZEN_LOCK = threading.Lock()
_frozen_depth = 0


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """While a run or a drawing lasts, `free_memory`'s collections walk only the objects made since it began.

    A full collection walks every object of the process (in the app, or a test process, millions: near a
    second each time, several times a run), yet what a run frees (models, encoders, activations) it made
    itself. The older objects are set aside (`gc.freeze`) for the block and put back after it, so older
    garbage is collected as before, once the block ends. Nested and concurrent blocks share one freeze.
    """
    global _frozen_depth
    with _FROZEN_LOCK:
        if _frozen_depth == 0:
            gc.freeze()
        _frozen_depth += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            _frozen_depth -= 1
            if _frozen_depth == 0:
                gc.unfreeze()


def free_memory(*, reset_peak: bool = False) -> None:
    """Give the device back what dropped objects held: collect, return the C heap's free pages, then empty
    the CUDA / MPS caches.

    `reset_peak` also restarts CUDA's peak-memory counter (a new attempt measures its own peak).
    """
    gc.collect()
    from core.cpu_memory import give_back_freed_memory

    give_back_freed_memory()  # a CPU run keeps freed blocks for its steps (core.cpu_memory): not these
    torch_module = sys.modules.get("torch")
    if torch_module is None:  # nothing was ever put on a device
        return
    if torch_module.cuda.is_available():
        torch_module.cuda.empty_cache()
        if reset_peak:
            torch_module.cuda.reset_peak_memory_stats()
    if _mps_available(torch_module) and getattr(torch_module, "mps", None) is not None:
        torch_module.mps.empty_cache()


def peak_vram_gb() -> float | None:
    """The most CUDA memory this process has held (None off CUDA)."""
    torch_module = sys.modules.get("torch")
    if torch_module is not None and torch_module.cuda.is_available():
        return torch_module.cuda.max_memory_allocated() / GIB
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory errors, also when wrapped in another exception."""
    torch_module = sys.modules.get("torch")  # no torch loaded: no torch error to look for
    oom_types: tuple[type[BaseException], ...] = (MemoryError,)
    if torch_module is not None:
        oom_types += (torch_module.OutOfMemoryError,)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, oom_types):
            return True
        if isinstance(current, Exception) and any(t in str(current).lower() for t in _OOM_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False
