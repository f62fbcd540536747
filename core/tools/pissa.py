"""PiSSA -> plain LoRA, so an exported PiSSA LoRA works on the ORIGINAL base model.

PiSSA starts the adapter from the top singular vectors of W and trains on the residual
W_res = W - s * B0 @ A0. After training the model is W_res + s * B @ A, so the change to the
original model is s * (B @ A - B0 @ A0): a LoRA of twice the rank,
down = [A; A0], up = [B, -B0] (PEFT's `subtract_mutated_init`). Without the conversion the
file is only right on top of W_res, which no user has. The scale stays the same, so the
kohya-style alpha doubles with the rank.
"""
from __future__ import annotations

import torch

from core.tools.modules import LoraModule, LoraToolError


def pissa_to_lora(trained: dict[str, LoraModule], initial: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """`{name: module}` of the trained PiSSA adapter + its initial values -> plain LoRA modules."""
    out: dict[str, LoraModule] = {}
    for name, module in trained.items():
        start = initial.get(name)
        if start is None:
            raise LoraToolError(f"PiSSA module '{name}' has no initial value; keep the adapter as it was right after "
                                "initialisation (before the first step) to convert it.")
        if start.rank != module.rank or abs(start.scale - module.scale) > 1e-6 * max(1.0, abs(module.scale)):
            raise LoraToolError(f"PiSSA module '{name}': the initial adapter has another rank or scale.")
        down = torch.cat([module.down, start.down.to(module.down.dtype)], 0)
        up = torch.cat([module.up, -start.up.to(module.up.dtype)], 1)
        out[name] = LoraModule(down, up, module.scale * down.shape[0], module.dora_scale)
    return out
