"""Krea 2 in ComfyUI's layout: the transformer in krea-ai's native names (models/diffusion_models), Qwen3-VL-4B
(models/text_encoders: Hugging Face's names) and the Qwen-Image VAE (models/vae: qwen_image_vae.safetensors, the
Wan 2.1 VAE's names); configs and the tokenizer from `base_model_config` or the hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.families.dit.single_files import (diffusers_named, find_comfy_part, part_config, refuse_file, transformer_from_state,
                                            with_fp8_note)
from core.families.dit.video_vae import vae_key_to_wan
from core.families.dit.weights import comfy_models_root, local_only, read_upcast, safetensors_keys
from core.families.krea2.load import (HUB_CONFIGS, Krea2Model, is_krea2_keys, load_error, scheduler_config,
                                      text_layers_of, tokenizer_of, variant_from_name)
from core.family_api.contract import ModelLoadError


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (ComfyUI / krea-ai) transformer names -> diffusers', any prefix; diffusers names pass as they are."""
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    return diffusers_named(state, lambda named: "txtfusion.projector.weight" in named,
                           convert_krea2_transformer_checkpoint_to_diffusers)


_PARTS = {"text_encoder": (("text_encoders", "clip"), ("qwen3_vl", "qwen3-vl", "qwen_3_vl"),
                           "qwen3_vl_4b.safetensors (Qwen3-VL-4B) in models/text_encoders"),
          "vae": (("vae",), ("qwen_image_vae", "qwen-image-vae", "qwen_image"), "qwen_image_vae.safetensors in models/vae")}


def find_part(models_root: Path | None, part: str, explicit: str = "") -> Path:
    folders, words, hint = _PARTS[part]
    return find_comfy_part(models_root, part, explicit, folders=folders, words=words, needs=f"Krea 2 needs {hint}")


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    from diffusers import Krea2Transformer2DModel

    return transformer_from_state(
        Krea2Transformer2DModel, native_to_diffusers(read_upcast(path, dtype)), Path(path).name,
        config_source=config_source, dtype=dtype,
        label="Krea 2", load_error=load_error,
        hint="Use the Krea 2 transformer file from models/diffusion_models with a Krea 2 config folder.",
        shapes=lambda state, config: {"num_layers": len({k.split(".")[1] for k in state
                                                         if k.startswith("transformer_blocks.")})})


def text_encoder_from_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen3-VL file's names (`model.language_model.*` / `model.visual.*`, or the older `model.layers.*` /
    `visual.*`) -> Qwen3VLModel's; the LM head dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue
        key = key.removeprefix("model.")
        if key.startswith(("layers.", "embed_tokens.", "norm.")):
            key = "language_model." + key
        out[key] = value
    return out


def load_text_encoder_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """Qwen3-VL-4B from ComfyUI's text encoder file (vision tower included, as the pipeline's Qwen3VLModel has it)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Qwen3VLModel

    try:
        config = AutoConfig.from_pretrained(config_source, subfolder="text_encoder",
                                            local_files_only=local_only(config_source))
    except (OSError, ValueError) as exc:
        raise load_error("text encoder config", config_source, exc) from exc
    with init_empty_weights(include_buffers=False):  # buffers (RoPE tables) are not in the files: built for real
        model = Qwen3VLModel(config)
    try:
        model.load_state_dict(text_encoder_from_file(read_upcast(path, dtype)), strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit Krea 2's text encoder config: {exc}",
                             "Krea 2 uses Qwen3-VL-4B (qwen3_vl_4b.safetensors).") from exc
    return model.to(dtype).eval()


def load_vae_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """qwen_image_vae.safetensors (Wan 2.1 names) or a diffusers-named AutoencoderKLQwenImage file."""
    from diffusers import AutoencoderKLQwenImage

    config = part_config(AutoencoderKLQwenImage, config_source, "vae", load_error)
    model = AutoencoderKLQwenImage.from_config(config)
    names = {vae_key_to_wan(k, model.config.num_res_blocks): k for k in model.state_dict()}
    state = {k.removeprefix("first_stage_model.").removeprefix("vae."): v for k, v in read_upcast(path, dtype).items()}
    state = {names.get(k, k): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"'{Path(path).name}' is not the Qwen-Image VAE: {exc}",
                             "Krea 2 uses qwen_image_vae.safetensors (16 latent channels).") from exc
    return model.to(dtype).eval()


def load_single_file(transformer_file: str | Path, *, config_source: str = "", text_encoder: str = "",
                     vae: str = "", dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> Krea2Model:
    path = Path(transformer_file)
    refuse_file(path, fits=is_krea2_keys(safetensors_keys(path)), label="Krea 2", quantization_config=quantization_config,
                use="Use the Krea 2 file from ComfyUI's models/diffusion_models.")
    variant = variant_from_name(path.name)
    source = config_source or HUB_CONFIGS[variant]
    root = comfy_models_root(path)
    te_file = find_part(root, "text_encoder", text_encoder)
    vae_file = find_part(root, "vae", vae)
    model = Krea2Model(variant, load_transformer_file(path, config_source=source, dtype=dtype),
                       load_vae_file(vae_file, config_source=source, dtype=dtype),
                       load_text_encoder_file(te_file, config_source=source, dtype=dtype), tokenizer_of(source),
                       text_layers=text_layers_of(source), scheduler_config=scheduler_config(source), source=str(path),
                       is_single_file=True, notes=[f"Qwen3-VL: {te_file.name}", f"VAE: {vae_file.name}"])
    return with_fp8_note(model, path, dtype)
