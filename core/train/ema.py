"""An exponential moving average (EMA) of the adapter weights, for every task the training loop runs.

The loop keeps, beside the trained (raw) weights, a shadow copy updated after each optimizer step:
`shadow = d * shadow + (1 - d) * weight`. With the warm-up on, the n-th update (n = 1, 2, ...) uses
`d = min(ema_decay, n / (n + 9))` -- the usual `(1 + step) / (10 + step)` rule of diffusers' EMAModel
and timm -- so the average does not drag the first steps' random start along for thousands of steps.

Only what the optimizer trains is averaged (the LoRA / LoKr / LoHa parameters, never the frozen base).
Previews, checkpoint files and the final files are written with the EMA weights swapped in (`applied`);
the raw weights come back right after, so training goes on from them. A checkpoint keeps both (the raw
weights and the shadow, in `ema.safetensors`) and a resume continues exactly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

EMA_FILE = "ema.safetensors"
# On the device only while it leaves this much free beside the shadow copy ("auto").
_HEADROOM_BYTES = 1 << 30


def warmup_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of the `updates`-th update (1-based)."""
    return min(decay, updates / (updates + 9.0)) if warmup else decay


def trained_parameters(param_groups: Sequence[dict[str, Any]]) -> list[torch.nn.Parameter]:
    """The optimizer's parameters in their fixed order (the same in every run of the same config)."""
    seen: set[int] = set()
    params = []
    for group in param_groups:
        for param in group["params"]:
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def shadow_device(params: Sequence[torch.Tensor], where: str) -> torch.device:
    """Where the shadow lives: 'cpu', 'device' (beside the weights) or 'auto' (the device when it has room)."""
    device = params[0].device if params else torch.device("cpu")
    if where == "cpu" or device.type != "cuda":
        return torch.device("cpu") if where == "cpu" else device
    if where == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    needed = sum(p.numel() for p in params) * 4
    return device if free > needed + _HEADROOM_BYTES else torch.device("cpu")


class AdapterEMA:
    """The EMA of a list of trained parameters (fp32 shadow, wherever `shadow_device` put it)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, *, warmup: bool = True,
                 where: str = "auto") -> None:
        self.params = list(params)
        self.decay, self.warmup = float(decay), warmup
        self.device = shadow_device(self.params, where)
        self.shadow = [p.detach().to(self.device, torch.float32, copy=True) for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average over from the current weights."""
        for shadow, param in zip(self.shadow, self.params):
            shadow.copy_(param.detach())
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (call after each optimizer step)."""
        self.updates += 1
        d = warmup_decay(self.decay, self.updates, self.warmup)
        for shadow, param in zip(self.shadow, self.params):
            shadow.mul_(d).add_(param.detach().to(self.device, torch.float32), alpha=1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the parameters meanwhile; the raw ones back afterwards (bit for bit)."""
        raw = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for param, shadow in zip(self.params, self.shadow):
                    param.copy_(shadow.to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, raw):
                    param.copy_(value)

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the shadow, the raw weights (the checkpoint's LoRA files hold the
        EMA ones) and the update count."""
        # Copies: on the CPU .cpu() would alias the live tensors, which `applied` then overwrites.
        out = {f"ema.{i}": s.detach().to("cpu", copy=True) for i, s in enumerate(self.shadow)}
        out.update({f"raw.{i}": p.detach().to("cpu", torch.float32, copy=True) for i, p in enumerate(self.params)})
        out["updates"] = torch.tensor([self.updates], dtype=torch.int64)
        return out

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Back to a checkpoint's state: the shadow, and the raw weights into the parameters."""
        if len([k for k in state if k.startswith("ema.")]) != len(self.params):
            raise ValueError("The checkpoint's EMA holds another set of weights (other LoRA settings); "
                             "resume with the settings it was saved with, or turn ema off.")
        for i, (param, shadow) in enumerate(zip(self.params, self.shadow)):
            shadow.copy_(state[f"ema.{i}"])
            param.copy_(state[f"raw.{i}"].to(param.device, param.dtype))
        self.updates = int(state["updates"][0])


def maybe_ema(cfg: Any, param_groups: Sequence[dict[str, Any]]) -> AdapterEMA | None:
    """The run's EMA when `ema: true`, else None."""
    if not getattr(cfg, "ema", False):
        return None
    return AdapterEMA(trained_parameters(param_groups), cfg.ema_decay, warmup=cfg.ema_warmup,
                      where=cfg.ema_device)


def applied(ema: AdapterEMA | None) -> contextlib.AbstractContextManager:
    """`ema.applied()`, or nothing when the run has no EMA."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
