"""Z-Image (Turbo and base): detection, loading and the LoRA targets (prompts: `text`, the loss: `loss`).

Z-Image is a single-stream DiT (`ZImageTransformer2DModel`: 30 main layers plus 2 noise-refiner
and 2 context-refiner layers, width 3840, 6.15 B parameters) over FLUX's 16-channel AE, conditioned
on Qwen3-4B's second-to-last hidden states. Facts read from diffusers 0.42 (`ZImagePipeline`):

- Prompt: the Qwen chat template (`[{"role": "user", "content": prompt}]`, generation prompt,
  `enable_thinking=True`), padded to 512 tokens; `hidden_states[-2]` of the real tokens only
  (the padding is cut off, so each caption is a variable-length [L, 2560] tensor).
- The transformer takes lists: latents [C, 1, h, w] per image (a frame axis) and the captions'
  [L, 2560] tensors; its time input is `1 - sigma` (0 = noise, 1 = clean) and it predicts
  `x0 - noise` (the pipeline negates it into the velocity `noise - x0`).
- Latents: `(sample - shift_factor) * scaling_factor` of the AE, as for FLUX.
- Turbo and base share every shape; the name tells them apart ("turbo" in the hub id, folder or
  file name), as it does for ComfyUI's z_image_turbo_bf16.safetensors.

Two layouts: a diffusers folder / hub id (here), or ComfyUI's single files (`single_file`).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.families.dit import folders
from core.families.dit.folders import config_error, quantized
from core.families.dit.single_files import has_marker, strip_model_prefix
from core.hub import offline
from core.families.dit.default import LoadedModel
from core.families.dit.weights import detect_source, local_only
from core.family_api.contract import ModelLoadError

VARIANTS = ("z-image-turbo", "z-image")
HUB_CONFIGS = {"z-image-turbo": "Tongyi-MAI/Z-Image-Turbo", "z-image": "Tongyi-MAI/Z-Image"}
MAX_SEQUENCE_LENGTH = 512
# Native (ComfyUI / original) tensor names that only a Z-Image transformer has.
NATIVE_MARKERS = ("context_refiner.0.attention.qkv.weight", "noise_refiner.0.attention.qkv.weight")
DIFFUSERS_MARKERS = ("context_refiner.0.attention.to_q.weight", "noise_refiner.0.attention.to_q.weight")


@dataclass
class ZImageModel(LoadedModel):
    """The modules of a Z-Image pipeline and what training needs to know about them."""

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any


# --- detection ---------------------------------------------------------------------------------------


_strip = strip_model_prefix


def is_zimage_keys(keys: Iterable[str]) -> bool:
    return has_marker(keys, NATIVE_MARKERS + DIFFUSERS_MARKERS)


def variant_from_name(name: str) -> str:
    """Turbo when the name says so (Z-Image-Turbo, z_image_turbo_bf16); the base model otherwise."""
    return "z-image-turbo" if "turbo" in name.lower() else "z-image"


def _is_zimage_config(*configs: dict[str, Any] | None) -> bool:
    return any("ZImage" in str((c or {}).get("_class_name", "")) for c in configs)


def _hub_variant(base_model: str) -> str | None:
    if any(w in base_model.lower() for w in ("z-image", "z_image", "zimage")):
        return variant_from_name(base_model)
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(base_model, local_files_only=offline()))
    except Exception:  # noqa: BLE001 - not a reachable pipeline: another family's loader reports it
        return None
    return variant_from_name(base_model) if _is_zimage_config(index) else None


def detect(base_model: str) -> str | None:
    """"z-image-turbo" / "z-image" for a Z-Image file, diffusers folder or (cached) hub id, else None."""
    return detect_source(
        base_model, fits=is_zimage_keys, file_variant=lambda path: variant_from_name(path.name), hub_variant=_hub_variant,
        folder_variant=lambda path, index, transformer: (variant_from_name(path.name)
                                                         if _is_zimage_config(index, transformer) else None))


# --- loading ------------------------------------------------------------------------------------------


def _load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    return config_error("Z-Image", what, source, exc,
        "A single-file Z-Image needs base_model_config: a diffusers Z-Image folder (model_index.json, "
        "transformer/, text_encoder/, tokenizer/, vae/, scheduler/ configs; the weights are not needed), "
        "or the hub id Tongyi-MAI/Z-Image-Turbo downloaded once with internet access.")


def _scheduler_config(source: str) -> dict[str, Any]:
    return folders.scheduler_config(source, {"shift": 3.0, "use_dynamic_shifting": False})  # Z-Image-Turbo's


def _tokenizer(source: str) -> Any:
    return folders.tokenizer_of(source, _load_error)


def load_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> ZImageModel:
    """A diffusers Z-Image folder or hub id, component by component, on the CPU."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoModel

    kw = {"local_files_only": local_only(source)}
    try:
        transformer = ZImageTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype,
                                                               **kw, **quantized(quantization_config))
        text_encoder = AutoModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw).eval()
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{source}' is not a loadable Z-Image diffusers folder or hub id: {exc}",
                             "A diffusers Z-Image folder has model_index.json and transformer/, text_encoder/, "
                             "tokenizer/, vae/ and scheduler/.") from exc
    return ZImageModel(variant_from_name(Path(source).name if Path(source).is_dir() else source), transformer,
                       vae, text_encoder, _tokenizer(source), scheduler_config=_scheduler_config(source),
                       source=str(source))


def load_model(base_model: str, *, config_source: str = "", text_encoder: str = "", vae: str = "",
               dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> ZImageModel:
    """Any Z-Image source: a single .safetensors (ComfyUI layout), a diffusers folder or a hub id."""
    from core.families.zimage.single_file import find_part, load_single_file, load_vae_file

    if Path(base_model).is_file():
        return load_single_file(base_model, config_source=config_source, text_encoder=text_encoder, vae=vae,
                                dtype=dtype, quantization_config=quantization_config)
    if base_model.lower().endswith(".safetensors"):
        raise ModelLoadError(f"The Z-Image model file '{base_model}' does not exist.", "Check base_model.")
    model = load_folder(base_model, dtype=dtype, quantization_config=quantization_config)
    if vae:
        model.vae = load_vae_file(find_part(None, "vae", vae), config_source=config_source or base_model, dtype=dtype)
        model.notes.append(f"AE from {vae}")
    return model


# --- LoRA targets ---------------------------------------------------------------------------------------

BLOCK_SCOPES = ("layers", "noise_refiner", "context_refiner")
ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
MLP = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def lora_targets(transformer: torch.nn.Module, preset: str = "all") -> list[str]:
    """Module paths of the attention (+ MLP) Linears of every block (main layers and both refiners)."""
    suffixes = ATTENTION + (MLP if preset != "attention" else ())
    return [name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.split(".")[0] in BLOCK_SCOPES
            and name.split(".", 2)[-1] in suffixes]
