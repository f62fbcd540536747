"""Krea 2 in ComfyUI's layout: the transformer in krea-ai's native names (models/diffusion_models), Qwen3-VL-4B
(models/text_encoders: Hugging Face's names) and the Qwen-Image VAE (models/vae: qwen_image_vae.safetensors, the
Wan 2.1 VAE's names); configs and the tokenizer from `base_model_config` or the hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.families.dit.video_vae import vae_key_to_wan
from core.families.dit.weights import (comfy_models_root, config_subfolder, file_has_fp8, fp8_note, local_only,
                                       read_upcast, safetensors_keys)
from core.families.krea2.load import (HUB_CONFIGS, Krea2Model, is_krea2_keys, load_error, scheduler_config, strip,
                                      text_layers_of, tokenizer_of, variant_from_name)
from core.family_api.contract import ModelLoadError


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (ComfyUI / krea-ai) transformer names -> diffusers', any prefix; diffusers names pass as they are."""
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    state = {strip(k): v for k, v in state.items()}
    if "txtfusion.projector.weight" not in state:
        return state
    return convert_krea2_transformer_checkpoint_to_diffusers(state)


def find_part(models_root: Path | None, part: str, explicit: str = "") -> Path:
    if explicit:
        if not Path(explicit).is_file():
            raise ModelLoadError(f"The {part} file '{explicit}' does not exist.", f"Check the {part} path.")
        return Path(explicit)
    folders, words = {"text_encoder": (("text_encoders", "clip"), ("qwen3_vl", "qwen3-vl", "qwen_3_vl")),
                      "vae": (("vae",), ("qwen_image_vae", "qwen-image-vae", "qwen_image"))}[part]
    found: list[Path] = []
    for sub in folders if models_root else ():
        if (models_root / sub).is_dir():
            found += sorted(p for p in (models_root / sub).rglob("*.safetensors")
                            if any(w in p.name.lower() for w in words))
    if not found:
        hint = {"text_encoder": "qwen3_vl_4b.safetensors (Qwen3-VL-4B) in models/text_encoders",
                "vae": "qwen_image_vae.safetensors in models/vae"}[part]
        raise ModelLoadError(f"Krea 2 needs {hint}, and none was found.",
                             "Put the file there, or give its path in the "
                             f"{'text_encoder_files' if part == 'text_encoder' else part} setting.")
    return found[0]


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    from diffusers import Krea2Transformer2DModel

    state = native_to_diffusers(read_upcast(path, dtype))
    try:
        config = dict(Krea2Transformer2DModel.load_config(
            config_source, subfolder=config_subfolder(config_source, "transformer"),
            local_files_only=local_only(config_source)))
    except (OSError, ValueError) as exc:
        raise load_error("transformer config", config_source, exc) from exc
    config["num_layers"] = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    try:
        with torch.device("meta"):
            model = Krea2Transformer2DModel.from_config(config)
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit the Krea 2 config from '{config_source}': {exc}",
                             "Use the Krea 2 transformer file from models/diffusion_models with a Krea 2 config "
                             "folder.") from exc
    return model.to(dtype).eval()


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

    try:
        config = dict(AutoencoderKLQwenImage.load_config(config_source, subfolder=config_subfolder(config_source, "vae"),
                                                         local_files_only=local_only(config_source)))
    except (OSError, ValueError) as exc:
        raise load_error("vae config", config_source, exc) from exc
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
    if not is_krea2_keys(safetensors_keys(path)):
        raise ModelLoadError(f"'{path.name}' is not a Krea 2 transformer.",
                             "Use the Krea 2 file from ComfyUI's models/diffusion_models.")
    if quantization_config is not None:
        raise ModelLoadError("base_quantization: nf4 needs a diffusers Krea 2 folder or hub id.",
                             "Give base_model as a diffusers folder, or use fp8_base with the single file.")
    variant = variant_from_name(path.name)
    source = config_source or HUB_CONFIGS[variant]
    root = comfy_models_root(path)
    te_file = find_part(root, "text_encoder", text_encoder)
    vae_file = find_part(root, "vae", vae)
    model = Krea2Model(variant, load_transformer_file(path, config_source=source, dtype=dtype),
                       load_vae_file(vae_file, config_source=source, dtype=dtype),
                       load_text_encoder_file(te_file, config_source=source, dtype=dtype), tokenizer_of(source),
                       scheduler_config(source), str(path), text_layers=text_layers_of(source), is_single_file=True,
                       notes=[f"Qwen3-VL: {te_file.name}", f"VAE: {vae_file.name}"])
    if file_has_fp8(path):
        model.notes.append(fp8_note(path, dtype))
    return model
