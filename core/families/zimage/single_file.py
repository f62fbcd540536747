"""Z-Image in ComfyUI's layout: the transformer in native names (models/diffusion_models), Qwen3-4B's
qwen_3_4b.safetensors (models/text_encoders) and FLUX.1's ae.safetensors (models/vae); configs and the
tokenizer from `base_model_config` or the hub.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.families.dit.folders import fitting
from core.families.dit.single_files import (diffusers_named, find_comfy_part, text_model_from_file, transformer_from_state,
                                            with_fp8_note)
from core.families.dit.weights import comfy_models_root, config_subfolder, local_only, read_upcast, safetensors_keys
from core.families.zimage.load import (HUB_CONFIGS, ZImageModel, _load_error, _scheduler_config, _tokenizer,
                                       is_zimage_keys, variant_from_name)
from core.family_api.contract import ModelLoadError


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (ComfyUI) transformer names -> diffusers', any prefix; diffusers-named files pass as they are."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return diffusers_named(state, lambda named: any(".attention.qkv." in k for k in named),
                           convert_z_image_transformer_checkpoint_to_diffusers)


_PARTS = {"text_encoder": (("text_encoders", "clip"), ("qwen",), "qwen_3_4b.safetensors (Qwen3-4B) in models/text_encoders"),
          "vae": (("vae",), ("ae", "flux", "vae"), "ae.safetensors (FLUX's autoencoder) in models/vae")}


def find_part(models_root: Path | None, part: str, explicit: str = "") -> Path:
    """qwen_3_4b.safetensors (text_encoders) or ae.safetensors (vae): given, or found in ComfyUI's folders."""
    folders, words, hint = _PARTS[part]
    return find_comfy_part(models_root, part, explicit, folders=folders, words=words,
                           first=("ae", "qwen_3_4b", "qwen3"), needs=f"Z-Image needs {hint}")


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32,
                          quantization_config: Any = None) -> Any:
    """The transformer from a native-named (ComfyUI) or diffusers-named single file; fp8 upcast."""
    from diffusers import ZImageTransformer2DModel

    if quantization_config is not None:
        raise ModelLoadError("base_quantization: nf4 needs a diffusers Z-Image folder or hub id.",
                             "Give base_model as a diffusers folder, or use fp8_base with the single file.")
    state = native_to_diffusers(read_upcast(path, dtype))
    state = {k: v for k, v in state.items() if not k.startswith(("vae.", "text_encoders.", "first_stage_model."))}
    return transformer_from_state(
        ZImageTransformer2DModel, state, Path(path).name, config_source=config_source, dtype=dtype,
        label="Z-Image", load_error=_load_error,
        hint="Use the transformer file from models/diffusion_models (z_image_turbo_bf16.safetensors) with a Z-Image "
             "config folder.",
        shapes=lambda state, config: {"n_layers": len({int(k.split(".")[1]) for k in state if k.startswith("layers.")})})


# Qwen3-4B from qwen_3_4b.safetensors (Qwen3ForCausalLM names, `model.` prefix; the LM head is dropped).
load_text_encoder_file = partial(text_model_from_file, label="Z-Image", load_error=_load_error, kind="Qwen3",
                                 use="Use qwen_3_4b.safetensors from ComfyUI's models/text_encoders.",
                                 hint="Use qwen_3_4b.safetensors (Qwen3-4B), not another Qwen model.")


def load_vae_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    from diffusers import AutoencoderKL

    with fitting(Path(path).name, lambda exc: _load_error("vae config", config_source, exc),
                 "is not FLUX's autoencoder", "Z-Image uses FLUX.1's ae.safetensors (16 latent channels)."):
        return AutoencoderKL.from_single_file(read_upcast(path, dtype), config=config_source,
                                              subfolder=config_subfolder(config_source, "vae"), torch_dtype=dtype,
                                              local_files_only=local_only(config_source))


def load_single_file(transformer_file: str | Path, *, config_source: str = "", text_encoder: str = "",
                     vae: str = "", dtype: torch.dtype = torch.float32, quantization_config: Any = None
                     ) -> ZImageModel:
    """ComfyUI layout: the transformer file plus Qwen3-4B and the AE found next to it (or given)."""
    path = Path(transformer_file)
    if not is_zimage_keys(safetensors_keys(path)):
        raise ModelLoadError(f"'{path.name}' is not a Z-Image transformer.",
                             "Use z_image_turbo_bf16.safetensors from ComfyUI's models/diffusion_models.")
    variant = variant_from_name(path.name)
    root = comfy_models_root(path)
    te_file = find_part(root, "text_encoder", text_encoder)
    vae_file = find_part(root, "vae", vae)
    source = config_source or HUB_CONFIGS[variant]
    tokenizer = _tokenizer(source)
    transformer = load_transformer_file(path, config_source=source, dtype=dtype,
                                        quantization_config=quantization_config)
    model = ZImageModel(variant, transformer, load_vae_file(vae_file, config_source=source, dtype=dtype),
                        load_text_encoder_file(te_file, config_source=source, dtype=dtype), tokenizer,
                        scheduler_config=_scheduler_config(source), source=str(path), is_single_file=True,
                        notes=[f"Qwen3: {te_file.name}", f"AE: {vae_file.name}"])
    return with_fp8_note(model, path, dtype)
