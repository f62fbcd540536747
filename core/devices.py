"""The training device as the presets see it: kind, name, memory, bf16, bitsandbytes.

`detect_device()` is the one call that asks the hardware; everything else (preset
choice, the memory estimate, OOM advice) takes a `DeviceInfo`, so tests simulate any
GPU by building one, or by mocking this single function.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

GIB = 2**30


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
        import psutil  # noqa: PLC0415

        mem = psutil.virtual_memory()
        return mem.total / GIB, mem.available / GIB
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: a modest guess
        return 8.0, 4.0


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def detect_device(index: int | None = None) -> DeviceInfo:
    """The device training will use: CUDA GPU `index` (default: this process's LOCAL_RANK, as
    accelerate/torchrun assign it), else Apple MPS, else the CPU."""
    import torch  # noqa: PLC0415

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
