"""FLUX.1 / Chroma LoRA files for the LoRA tools: read any form into BFL-named kohya modules, write
the WebUI / Forge / ComfyUI file or the diffusers file back (through core.families.flux.lora_files).

The tools (resize, merge, convert) work on one naming scheme: BFL kohya names
(`lora_unet_double_blocks_0_img_attn_qkv`), what WebUI, Forge and ComfyUI load. A fused
module (qkv, linear1) stays one module there, so a resize finds the best rank of the fused
delta; the diffusers file splits it back into q, k, v (, proj_mlp) with the same delta.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.export.kohya import LoraFormatError
from core.tools.modules import LoraModule, LoraToolError, modules_to_kohya

_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def read_flux_kohya_tensors(path: str | Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """kohya (BFL-named) tensors of a FLUX LoRA file in any form (kohya, ComfyUI, diffusers).

    A kohya file is kept as it is (text encoder modules too); ComfyUI's `diffusion_model.` and
    diffusers' `transformer.` forms are converted, each module with its alpha.
    """
    from core.families.flux.lora_files import flux_peft_to_kohya, read_flux_lora

    if tensors and all(k.startswith(("lora_unet_", *_TE_PREFIXES)) for k in tensors):
        return tensors
    try:
        peft, alphas, _ = read_flux_lora(path)
        return flux_peft_to_kohya(peft, alpha=alphas)
    except LoraFormatError as exc:
        raise LoraToolError(f"'{Path(path).name}': {exc}") from exc


def _transformer_peft(modules: dict[str, LoraModule], *, ignore_text_encoders: bool
                      ) -> tuple[dict[str, Tensor], dict[str, float]]:
    from core.families.flux.lora_files import flux_kohya_to_peft

    if any(m.dora_scale is not None for m in modules.values()):
        raise LoraToolError("A FLUX DoRA LoRA cannot be converted here; only plain LoRA modules are.")
    try:
        return flux_kohya_to_peft(modules_to_kohya(modules), ignore_text_encoders=ignore_text_encoders)
    except LoraFormatError as exc:
        raise LoraToolError(str(exc)) from exc


def _rank_and_alpha(peft: dict[str, Tensor], alphas: dict[str, float]) -> tuple[int, float]:
    """The most common rank and alpha of the unfused modules (what ss_network_dim / _alpha say)."""
    ranks = Counter(int(v.shape[0]) for k, v in peft.items() if k.endswith(".lora_A.weight"))
    return ranks.most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]


def write_flux_kohya(modules: dict[str, LoraModule], path: str | Path, *, variant: str,
                     metadata: dict[str, str], dtype: torch.dtype | None) -> Path:
    """The WebUI / Forge / ComfyUI file: BFL kohya names, flux1 / chroma metadata, sshs hashes.

    The modules are written as they are (a resized fused module keeps its one shared rank);
    the identity keys come from flux_kohya_metadata, descriptive ones (merged from, title) stay.
    """
    from core.export.kohya import save_kohya_lora
    from core.families.flux.lora_files import check_modules_match_variant, flux_kohya_metadata

    peft, alphas = _transformer_peft(modules, ignore_text_encoders=True)
    try:
        check_modules_match_variant(list(alphas), variant)
    except LoraFormatError as exc:
        raise LoraToolError(str(exc)) from exc
    rank, alpha = _rank_and_alpha(peft, alphas)
    base = flux_kohya_metadata(variant, rank=rank, alpha=alpha)
    kept = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.")) and not k.startswith("sshs_")}
    identity = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")
    merged = {**base, **kept, **{k: base[k] for k in identity}}
    for key in ("ss_network_dim", "ss_network_alpha"):
        if kept.get(key) == "Dynamic":  # a resize to an energy ratio: a rank per module, as kohya marks it
            merged[key] = "Dynamic"
    return save_kohya_lora(path, modules_to_kohya(modules), merged, dtype=dtype)


def _lora_config(peft: dict[str, Tensor], alphas: dict[str, float]) -> dict[str, Any]:
    """The LoraConfig dict diffusers reads from `lora_adapter_metadata` (patterns where modules differ)."""
    import re

    rank, alpha = _rank_and_alpha(peft, alphas)
    ranks = {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in peft.items() if k.endswith(".lora_A.weight")}
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != rank},
            "alpha_pattern": {re.escape(p): alphas[p] for p in ranks if alphas[p] != alpha}}


def write_flux_diffusers(modules: dict[str, LoraModule], folder: str | Path, *,
                         dtype: torch.dtype | None) -> Path:
    """`folder/pytorch_lora_weights.safetensors` as FluxPipeline / ChromaPipeline load it."""
    from core.families.flux.lora_files import write_flux_diffusers_file

    if any(name.startswith(_TE_PREFIXES) for name in modules):
        raise LoraToolError("This FLUX LoRA also trains a text encoder; diffusers' FLUX file here holds the "
                            "transformer only. Keep it as a kohya file.")
    peft, alphas = _transformer_peft(modules, ignore_text_encoders=False)
    return write_flux_diffusers_file(peft, folder, lora_config=_lora_config(peft, alphas), dtype=dtype)


def read_flux_peft(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The transformer's diffusers-named PEFT state and alpha per module of a FLUX LoRA in any form."""
    from core.families.flux.lora_files import read_flux_lora

    peft, alphas, _ = read_flux_lora(path, ignore_text_encoders=True)
    return peft, alphas
