"""LoKr / LoHa (LyCORIS) files: PEFT's LoKr/LoHa state -> the key names WebUI/Forge and ComfyUI load,
and the update (delta) a file's module makes, for merging and checks.

    <prefix>_<module path, dots as underscores>.lokr_w1 | lokr_w1_a, lokr_w1_b   (first Kronecker factor)
                                                .lokr_w2 | lokr_w2_a, lokr_w2_b   (second)
                                                .hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b  (LoHa)
                                                .alpha

The prefixes and module names are kohya's (`core.export.kohya`). PEFT's tensors are LyCORIS' own
layout (PEFT ported LyCORIS' modules), so they are written as they are. The scale differs in one
case: loaders use alpha / rank where a factor is rank-decomposed and 1 where both LoKr factors are
whole, while PEFT always scales by alpha / r; for whole factors the scale is baked into w1 and no
alpha is written (diffusers' `_bake_lokr_alpha_` reads LyCORIS files the same way).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from core.export.kohya import (TEXT_ENCODER_NAMES, UNET_PREFIX, LoraFormatError, _alpha_for, _check_family,
                               _kohya_name_to_path, canonical_text_encoder_path, text_encoder_prefixes)
from core.export.sgm_names import diffusers_to_sgm, path_to_underscored
from core.family_api.registry import family_info

LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
PARTS = LOKR_PARTS + LOHA_PARTS
_PEFT_KEY = re.compile(rf"^(?P<module>.+?)\.(?P<part>{'|'.join(PARTS)})(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")


def is_lycoris_state(state: dict[str, Tensor]) -> bool:
    """True for PEFT LoKr/LoHa state dicts and LyCORIS files (any lokr_/hada_ key)."""
    return any(".lokr_" in k or ".hada_" in k for k in state)


def group_peft_state(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module path: {part: tensor}} of a PEFT LoKr/LoHa state dict."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise LoraFormatError(f"'{key}' is not a LoKr/LoHa weight PEFT writes ({', '.join(PARTS)}).")
        out.setdefault(match["module"], {})[match["part"]] = value
    return out


def file_rank(parts: dict[str, Tensor]) -> int | None:
    """The rank loaders divide alpha by (ComfyUI / WebUI: w2_b's, else w1_b's; None when both LoKr factors
    are whole)."""
    if "hada_w1_b" in parts:
        return int(parts["hada_w1_b"].shape[0])
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in parts:
            return int(parts[key].shape[0])
    return None


def module_for_file(parts: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """One module's tensors as a LyCORIS file holds them, `scale` (PEFT's alpha / r) kept exactly."""
    if any(k in parts for k in ("lokr_t2", "hada_t1", "hada_t2")):
        raise LoraFormatError("Tucker-decomposed (use_effective_conv2d) LoKr/LoHa convolutions are not written.")
    out = dict(parts)
    rank = file_rank(parts)
    if rank is None:  # both LoKr factors whole: loaders apply no alpha, so the scale goes into w1
        out["lokr_w1"] = parts["lokr_w1"] * scale
    else:
        out["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out


def scales_from_model(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """{module path: PEFT scale} of a model with LoKr/LoHa layers (each layer's own alpha / r)."""
    scales: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter_name in scaling:
            for strip in ("base_model.model.", "base_model."):
                if name.startswith(strip):
                    name = name[len(strip):]
                    break
            scales[name] = float(scaling[adapter_name])
    return scales


def peft_to_lycoris(unet_state: dict[str, Tensor], text_encoder_states: list[dict[str, Tensor]], family: str,
                    *, scales: dict[str, float]) -> dict[str, Tensor]:
    """PEFT LoKr/LoHa state dicts of the UNet and text encoder(s) -> one LyCORIS state dict in kohya names.

    `scales`: {component.path: PEFT scale (alpha / r)}, as `scales_from_model` reads them per component.
    """
    _check_family(family)
    te_prefixes = text_encoder_prefixes(family)
    jobs = [("unet", UNET_PREFIX, unet_state or {})]
    jobs += [(TEXT_ENCODER_NAMES[i], te_prefixes[i], s or {}) for i, s in enumerate(text_encoder_states)]
    out: dict[str, Tensor] = {}
    for component, prefix, state in jobs:
        for path, parts in group_peft_state(state).items():
            if component == "unet":
                name_path = diffusers_to_sgm(path) if family_info(family).sgm_unet_names else path
            else:
                name_path = canonical_text_encoder_path(path)
            name = f"{prefix}_{path_to_underscored(name_path)}"
            if any(k.startswith(f"{name}.") for k in out):
                raise LoraFormatError(f"Two LoKr/LoHa modules map to the same name '{name}'.")
            scale = _alpha_for(component, path, scales, None)
            for part, tensor in module_for_file(parts, scale).items():
                out[f"{name}.{part}"] = tensor
    return out


def group_file(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{kohya module name: {part: tensor, "alpha": ...}} of a LyCORIS file (LoRA keys are left out)."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if part in PARTS or part == "alpha":
            out.setdefault(name, {})[part] = value
    return {name: parts for name, parts in out.items() if any(p in parts for p in PARTS)}


def module_delta(parts: dict[str, Tensor], shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The weight update of one LyCORIS file module, shaped like the layer's weight (fp32).

    LoKr: kron(w1, w2) (each factor w or w_a @ w_b; a 4-d w2 is a conv kernel) * alpha / rank;
    LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank. The rank and scale rule is the loaders'
    (`file_rank`).
    """
    f = {k: v.float() for k, v in parts.items()}
    rank = file_rank(parts)
    scale = float(f["alpha"]) / rank if "alpha" in f and rank is not None else 1.0
    if "hada_w1_a" in f:
        delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        return (delta * scale).reshape(shape)
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


def kohya_name_to_module_path(name: str, family: str) -> tuple[str, str]:
    """('unet' or the text encoder's component name, diffusers module path) of a kohya module name."""
    for index, prefix in enumerate(text_encoder_prefixes(family)):
        if name.startswith(prefix + "_"):
            return TEXT_ENCODER_NAMES[index], _kohya_name_to_path(prefix, name[len(prefix) + 1:], family)
    if name.startswith(UNET_PREFIX + "_"):
        return "unet", _kohya_name_to_path(UNET_PREFIX, name[len(UNET_PREFIX) + 1:], family)
    raise LoraFormatError(f"'{name}' has no kohya prefix ({UNET_PREFIX}_, lora_te_...).")
