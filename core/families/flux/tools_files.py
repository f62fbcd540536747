"""FLUX.1 / Chroma LoRA files for the LoRA tools: read any form into BFL-named kohya modules, write
the WebUI / Forge / ComfyUI file or the diffusers file back (through core.families.flux.lora_files).

The tools (resize, merge, convert) work on one naming scheme: BFL kohya names
(`lora_unet_double_blocks_0_img_attn_qkv`), what WebUI, Forge and ComfyUI load. A fused
module (qkv, linear1) stays one module there, so a resize finds the best rank of the fused
delta; the diffusers file splits it back into q, k, v (, proj_mlp) with the same delta.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from core.export.kohya import LoraFormatError
from core.families.dit.tools_format import lora_config_of, rank_and_alpha, tool_metadata
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


def write_flux_kohya(modules: dict[str, LoraModule], path: str | Path, *, variant: str,
                     metadata: dict[str, str], dtype: torch.dtype | None) -> Path:
    """The WebUI / Forge / ComfyUI file: BFL kohya names, flux1 / chroma metadata, sshs hashes.

    The modules are written as they are (a resized fused module keeps its one shared rank);
    the identity keys come from flux_kohya_metadata, descriptive ones (merged from, title) stay.
    """
    from core.export.kohya import save_kohya_lora
    from core.families.flux.lora_files import IDENTITY_KEYS, check_modules_match_variant, flux_kohya_metadata

    peft, alphas = _transformer_peft(modules, ignore_text_encoders=True)
    try:
        check_modules_match_variant(list(alphas), variant)
    except LoraFormatError as exc:
        raise LoraToolError(str(exc)) from exc
    rank, alpha = rank_and_alpha(peft, alphas)
    merged = tool_metadata(flux_kohya_metadata(variant, rank=rank, alpha=alpha), metadata, IDENTITY_KEYS)
    return save_kohya_lora(path, modules_to_kohya(modules), merged, dtype=dtype)


def write_flux_diffusers(modules: dict[str, LoraModule], folder: str | Path, *,
                         dtype: torch.dtype | None) -> Path:
    """`folder/pytorch_lora_weights.safetensors` as FluxPipeline / ChromaPipeline load it."""
    from core.families.flux.lora_files import write_flux_diffusers_file

    if any(name.startswith(_TE_PREFIXES) for name in modules):
        raise LoraToolError("This FLUX LoRA also trains a text encoder; diffusers' FLUX file here holds the "
                            "transformer only. Keep it as a kohya file.")
    peft, alphas = _transformer_peft(modules, ignore_text_encoders=False)
    return write_flux_diffusers_file(peft, folder, lora_config=lora_config_of(peft, alphas), dtype=dtype)


def read_flux_peft(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The transformer's diffusers-named PEFT state and alpha per module of a FLUX LoRA in any form."""
    from core.families.flux.lora_files import read_flux_lora

    peft, alphas, _ = read_flux_lora(path, ignore_text_encoders=True)
    return peft, alphas
