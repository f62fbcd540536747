"""LoKr / LoHa (LyCORIS) files of the transformer families: LyCORIS keys under diffusers' module names.

    transformer.<diffusers module path>.lokr_w1 | lokr_w1_a, lokr_w1_b | lokr_w2 | lokr_w2_a, lokr_w2_b | alpha
    transformer.<diffusers module path>.hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha

Why diffusers' names and not the native (BFL / Lumina2) ones the LoRA files use: the native models
fuse modules (FLUX's `img_attn.qkv`, the single blocks' `linear1` = q, k, v and the MLP input,
Z-Image's `attention.qkv`). A LoRA of three modules fuses exactly (down stacked, up block-diagonal),
but three Kronecker products stacked row-wise are not one Kronecker product of the fused weight (nor
are three Hadamard products one), so a LoKr trained per diffusers module has no native fused form.
Training at the fused granularity would need a fused qkv Linear in the diffusers model the run
trains, which it does not have. So the file keeps diffusers' modules, and ComfyUI applies it to the
native model anyway: `model_lora_keys_unet` maps `transformer.<diffusers name>` onto the native
weight, with a row offset for a fused one (its `flux_to_diffusers` / `z_image_to_diffusers` /
`mmdit_to_diffusers` tables; Qwen-Image's native names are diffusers'), and `calculate_weight`
narrows the weight to that offset before any adapter (LoKr, LoHa included) adds its update. No
native-named (`lora_unet_..._qkv.lokr_w1`) file is written, and converting such a file to the fused
layout is refused in one sentence (`refuse_fused`).

Tensors and the scale rule are core.export.lycoris' (the loaders' rule: alpha / rank where a factor
is rank-decomposed, baked into w1 where both LoKr factors are whole).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.export.kohya import LoraFormatError
from core.export.lycoris import PARTS, group_peft_state, module_delta, module_for_file

PREFIX = "transformer."


def peft_to_file_tensors(state: Mapping[str, Tensor], scales: Mapping[str, float]) -> dict[str, Tensor]:
    """A transformer's PEFT LoKr / LoHa state -> the file's tensors; `scales`: {module path: PEFT's alpha / r}."""
    out: dict[str, Tensor] = {}
    for path, parts in group_peft_state({k.removeprefix(PREFIX): v for k, v in state.items()}).items():
        if path not in scales:
            raise LoraFormatError(f"No LoKr / LoHa scale for '{path}'.")
        for part, tensor in module_for_file(parts, scales[path]).items():
            out[f"{PREFIX}{path}.{part}"] = tensor
    return out


def group_file(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{diffusers module path: {part: tensor}} of a transformer LyCORIS file (alpha included)."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        path, _, part = key.rpartition(".")
        if part not in PARTS and part != "alpha":
            raise LoraFormatError(f"'{key}' is not a LoKr / LoHa key ({', '.join(PARTS)}, alpha).")
        out.setdefault(path.removeprefix(PREFIX).removeprefix("diffusion_model."), {})[part] = value
    return {path: parts for path, parts in out.items() if any(p in parts for p in PARTS)}


def is_transformer_lycoris(tensors: Mapping[str, Any]) -> bool:
    """A LyCORIS file of a transformer family in diffusers names (not kohya's `lora_unet_` / `lora_te_`)."""
    return any(k.startswith(PREFIX) and (".lokr_" in k or ".hada_" in k) for k in tensors)


def write_file(path: Path, state: Mapping[str, Tensor], scales: Mapping[str, float], metadata: Mapping[str, Any],
               dtype: torch.dtype | None) -> Path:
    """The run's LoKr / LoHa file, atomically with sshs hashes (core.export.kohya.save_kohya_lora)."""
    from core.export.kohya import save_kohya_lora

    return save_kohya_lora(path, peft_to_file_tensors(state, scales), dict(metadata), dtype=dtype)


def refuse_fused(family: str) -> None:
    """Why no native-named (fused) LoKr / LoHa file is written, in one sentence."""
    raise LoraFormatError(f"A LoKr / LoHa of {family} cannot be written in the native fused layout (a fused qkv of "
                          "three Kronecker / Hadamard products is not one); its file keeps diffusers' module names, "
                          "which ComfyUI maps onto the fused weights itself.")


@contextmanager
def baked(transformer: nn.Module, files: list[tuple[Mapping[str, Tensor], float, str]]) -> Iterator[None]:
    """Add each (tensors, weight, name) file's update into `transformer`'s weights; put them back exactly after."""
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for tensors, weight, name in files:
                for path, parts in group_file(tensors).items():
                    try:
                        layer = transformer.get_submodule(path)
                    except AttributeError as exc:
                        raise ValueError(f"'{name}': the LoKr / LoHa module '{path}' is not a layer of this model: it "
                                         "was trained for another model family.") from exc
                    target = layer.weight
                    if not any(target is p for p, _ in saved):
                        saved.append((target, target.detach().to("cpu", copy=True)))
                    delta = module_delta(parts, target.shape) * weight
                    target.data = (target.data.float() + delta.to(target.device)).to(target.dtype)
        yield
    finally:
        with torch.no_grad():
            for param, copy in saved:
                param.data.copy_(copy)
