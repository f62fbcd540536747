"""Turn a DoRA image LoRA into a plain LoRA that every loader applies the same way.

A DoRA module's change to a layer depends on the base weight: `m * (W + dW) / ||W + dW|| - W`,
with one magnitude per output channel (PEFT's layout). diffusers drops `dora_scale`, WebUI
normalises per input column instead, and ComfyUI divides by `||W||`, so the same file gives
three different pictures. Here each DoRA module's real change is computed against the base
model it was trained on and factored by SVD into a plain LoRA (rank = the module's own rank
unless asked otherwise), with the relative error reported per module. Plain modules are
copied unchanged. The result is a kohya/WebUI file with no `dora_scale`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from core.tools.convert import write_kohya
from core.tools.merge import effective_delta, open_base_weights, paired_layers, read_image_lora_for
from core.tools.modules import LoraModule, LoraToolError, factor_delta
from core.tools.resize import ModuleResize, ResizeReport


def dora_modules_as_lora(pairs: list[tuple[str, LoraModule, torch.nn.Module]], *, rank: int | None = None
                         ) -> tuple[dict[str, LoraModule], ResizeReport]:
    """Plain LoRA modules with the same effect as (name, DoRA module, base layer) pairs."""
    if rank is not None and rank < 1:
        raise LoraToolError(f"The rank must be at least 1; got {rank}.")
    modules: dict[str, LoraModule] = {}
    report = ResizeReport()
    for name, module, layer in pairs:
        if module.dora_scale is None:
            modules[name] = module
            continue
        with torch.no_grad():
            delta = effective_delta(layer.weight, module, name)
        target = rank or module.rank
        # One alpha for every module (modules narrower than `target` keep fewer ranks): diffusers'
        # kohya loader mis-scales files whose alpha varies with the rank.
        plain, error = factor_delta(delta, target, alpha=float(target))
        modules[name] = plain
        report.modules.append(ModuleResize(name, module.rank, plain.rank, error, float(delta.norm())))
    return modules, report


def dora_to_lora(base_model: str, source: str | Path, output: str | Path, *, rank: int | None = None,
                 dtype: torch.dtype | None = torch.float16, model_config: str = "",
                 allow_pickle: bool = False) -> tuple[Path, ResizeReport]:
    """Write `source` (a DoRA LoRA for `base_model`) as a plain kohya LoRA file; returns (path, report)."""
    base = open_base_weights(base_model, allow_pickle=allow_pickle, model_config=model_config)
    lora = read_image_lora_for(source, base.family, allow_pickle=allow_pickle)
    if not lora.has_dora:
        raise LoraToolError(f"'{Path(source).name}' has no DoRA modules (no dora_scale): it already loads the same "
                            "everywhere. Use convert --to kohya to change its format.")
    lora.modules, report = dora_modules_as_lora(paired_layers(base.components, lora), rank=rank)
    extra = {"ss_network_args": "{}", "ss_converted_from": f"{Path(source).name} (DoRA)",
             "ss_base_model_for_conversion": Path(str(base_model)).name}
    return write_kohya(lora, output, dtype=dtype, metadata=extra), report
