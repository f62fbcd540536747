"""Detect and load FLUX.1 (dev / schnell) and Chroma as users have them.

Two layouts: a diffusers folder or hub id (FluxPipeline / ChromaPipeline components),
loaded here, or ComfyUI's single files (`flux_single_file`). `load_flux_model` takes
either. Detection reads only safetensors headers and config JSON (core.families.dit.weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import torch

from core.families.dit.folders import config_error, loading_parts, not_this_family, quantized, read_pipeline_configs
from core.hub import offline
from core.families.dit.default import LoadedModel
from core.families.dit.weights import read_json, safetensors_keys
from core.families.flux.convert import strip_prefix
from core.family_api.contract import ModelLoadError

VARIANTS = ("flux-dev", "flux-schnell", "chroma", "flux-kontext")
# Where configs + tokenizers come from when a single file is given without config_source.
HUB_CONFIGS = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell",
               "flux-kontext": "black-forest-labs/FLUX.1-Kontext-dev",
               "chroma": "lodestones/Chroma1-HD"}


@dataclass
class FluxModel(LoadedModel):
    """The modules of a FLUX-family pipeline plus what training needs to know about them.

    For Chroma `text_encoder`/`tokenizer` are None (it has no CLIP): the T5 is always
    `text_encoder_2`/`tokenizer_2`, so the encode code does not branch on names.
    """

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any | None
    text_encoder_2: Any
    tokenizer_2: Any

    @property
    def has_guidance(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))


# --- detection ---------------------------------------------------------------------------------


def variant_from_keys(keys: Iterable[str]) -> str | None:
    """`flux-dev` / `flux-schnell` / `chroma` from tensor names (BFL or diffusers), None if not FLUX."""
    names = set(strip_prefix(dict.fromkeys(keys)))
    bfl = any(k.startswith("double_blocks.") and ".img_attn.qkv." in k for k in names)
    diff = any(k.startswith("transformer_blocks.") and ".attn.add_q_proj." in k for k in names) and any(
        k.startswith("single_transformer_blocks.") for k in names)
    if not (bfl or diff):
        return None
    if any(k.startswith("single_stream_modulation.") for k in names):
        return None  # FLUX.2: the same block names, its own family (core.families.flux2)
    if any(k.startswith("distilled_guidance_layer.") for k in names):
        # Chroma replaced FLUX's modulation MLPs by one "approximator" and dropped the guidance input.
        return "chroma"
    if any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in names):
        return "flux-dev"
    return "flux-schnell"


def variant_from_folder_configs(index: dict[str, Any] | None, transformer_config: dict[str, Any]) -> str | None:
    """The variant from a diffusers folder's model_index.json and transformer/config.json."""
    names = " ".join(str(d.get("_class_name", "")) for d in (index or {}, transformer_config))
    if "Flux2" in names:
        return None  # FLUX.2: its own family (core.families.flux2)
    if "Chroma" in names:
        return "chroma"
    if "FluxKontext" in names:
        return "flux-kontext"
    if "Flux" not in names:
        return None
    return "flux-dev" if transformer_config.get("guidance_embeds") else "flux-schnell"


def detect_variant(source: str | Path) -> str | None:
    """The FLUX variant of a single file or diffusers folder (None when it is not a FLUX model)."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return None
        variant = variant_from_keys(safetensors_keys(path))
        # Kontext has FLUX.1-dev's tensors: only its file name tells (flux1-kontext-dev.safetensors).
        return "flux-kontext" if variant == "flux-dev" and "kontext" in path.name.lower() else variant
    if path.is_dir():
        index = read_json(path / "model_index.json")
        transformer = read_json(path / "transformer" / "config.json") or read_json(path / "config.json") or {}
        return variant_from_folder_configs(index, transformer)
    return None


# --- loading ---------------------------------------------------------------------------------------


def _config_source(variant: str, config_source: str) -> tuple[str, bool]:
    source = config_source or HUB_CONFIGS[variant]
    return source, Path(source).is_dir() or offline()


def _load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    return config_error("FLUX", what, source, exc,
        "A single-file FLUX needs base_model_config: a diffusers FLUX folder (model_index.json, transformer/, "
        "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, vae/ configs; the weights are not needed), "
        "or a hub id downloaded once with internet access.")


def _tokenizers(variant: str, source: str, local_only: bool) -> tuple[Any | None, Any]:
    from transformers import AutoTokenizer, CLIPTokenizer

    try:
        if variant == "chroma":
            return None, AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
        return (CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only),
                AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", local_files_only=local_only))
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", source, exc) from exc


def _scheduler_config(source: str, local_only: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler",
                                                                local_files_only=local_only))
    except (OSError, ValueError):
        # Only sampling uses it; FLUX.1-dev's values are a safe default.
        return {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096}


def load_flux_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                     defer_transformer: bool = False) -> FluxModel:
    """A FLUX.1 / Chroma diffusers folder or hub id, component by component, eval mode, on the CPU.
    `defer_transformer`: the transformer is left for `FluxModel.load_network` (training loads it last)."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    index, t_config, kw = read_pipeline_configs(
        source, FluxTransformer2DModel, "FLUX", "A diffusers FLUX folder has model_index.json and transformer/, vae/, "
        "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ and scheduler/.")
    local_only = kw["local_files_only"]
    variant = variant_from_folder_configs(index, t_config)
    if variant is None:
        raise not_this_family(source, index, "FLUX or Chroma")
    transformer_class = ChromaTransformer2DModel if variant == "chroma" else FluxTransformer2DModel

    def load_transformer() -> Any:
        with loading_parts(source):
            return transformer_class.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **kw,
                                                     **quantized(quantization_config))

    transformer = None if defer_transformer else load_transformer()
    with loading_parts(source):
        if variant == "chroma":
            text_encoder, t5 = None, T5EncoderModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw)
        else:
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw).eval()
            t5 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    tokenizer, tokenizer_2 = _tokenizers(variant, source, local_only)
    return FluxModel(variant, transformer, vae, text_encoder, tokenizer, t5.eval(), tokenizer_2,
                     scheduler_config=_scheduler_config(source, local_only), source=str(source),
                     network_loader=load_transformer if defer_transformer else None)


def load_flux_model(base_model: str, *, config_source: str = "", clip_l: str = "", t5: str = "", vae: str = "",
                    dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                    defer_transformer: bool = False) -> FluxModel:
    """Any FLUX / Chroma source: a single .safetensors (ComfyUI layout), a diffusers folder or a hub id."""
    if Path(base_model).is_file():
        from core.families.flux.single_file import load_flux_single_file

        return load_flux_single_file(base_model, config_source=config_source, clip_l=clip_l, t5=t5, vae=vae,
                                     dtype=dtype, quantization_config=quantization_config)
    if base_model.lower().endswith(".safetensors"):
        raise ModelLoadError(f"The FLUX model file '{base_model}' does not exist.", "Check base_model.")
    return load_flux_folder(base_model, dtype=dtype, quantization_config=quantization_config,
                            defer_transformer=defer_transformer)
