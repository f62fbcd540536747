"""Z-Image in ComfyUI's layout: the transformer in native names (models/diffusion_models), Qwen3-4B's
qwen_3_4b.safetensors (models/text_encoders) and FLUX.1's ae.safetensors (models/vae); configs and the
tokenizer from `base_model_config` or the hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.families.dit.weights import (comfy_models_root, config_subfolder, file_has_fp8, fp8_note, local_only,
                                       read_upcast, safetensors_keys)
from core.families.zimage.load import (HUB_CONFIGS, ZImageModel, _load_error, _scheduler_config, _strip, _tokenizer,
                                       is_zimage_keys, variant_from_name)
from core.family_api.contract import ModelLoadError


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (ComfyUI) transformer names -> diffusers', any prefix; diffusers-named files pass as they are."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    state = {_strip(k): v for k, v in state.items()}
    if not any(".attention.qkv." in k for k in state):
        return state
    return convert_z_image_transformer_checkpoint_to_diffusers(state)


def find_part(models_root: Path | None, part: str, explicit: str = "") -> Path:
    """qwen_3_4b.safetensors (text_encoders) or ae.safetensors (vae): given, or found in ComfyUI's folders."""
    if explicit:
        if not Path(explicit).is_file():
            raise ModelLoadError(f"The {part} file '{explicit}' does not exist.", f"Check the {part} path.")
        return Path(explicit)
    folders, words = {"text_encoder": (("text_encoders", "clip"), ("qwen",)),
                      "vae": (("vae",), ("ae", "flux", "vae"))}[part]
    found: list[Path] = []
    for sub in folders if models_root else ():
        if (models_root / sub).is_dir():
            found += sorted(p for p in (models_root / sub).rglob("*.safetensors")
                            if any(w in p.name.lower() for w in words))
    found.sort(key=lambda p: 0 if p.name.lower().startswith(("ae", "qwen_3_4b", "qwen3")) else 1)
    if not found:
        hint = {"text_encoder": "qwen_3_4b.safetensors (Qwen3-4B) in models/text_encoders",
                "vae": "ae.safetensors (FLUX's autoencoder) in models/vae"}[part]
        raise ModelLoadError(f"Z-Image needs {hint}, and none was found.",
                             f"Put the file there, or give its path in the "
                             f"{'text_encoder_files' if part == 'text_encoder' else part} "
                             "setting.")
    return found[0]


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32,
                          quantization_config: Any = None) -> Any:
    """The transformer from a native-named (ComfyUI) or diffusers-named single file; fp8 upcast."""
    from diffusers import ZImageTransformer2DModel

    state = native_to_diffusers(read_upcast(path, dtype))
    state = {k: v for k, v in state.items() if not k.startswith(("vae.", "text_encoders.", "first_stage_model."))}
    n_layers = len({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    quant = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        config = dict(ZImageTransformer2DModel.load_config(
            config_source, subfolder=config_subfolder(config_source, "transformer"),
            local_files_only=local_only(config_source)))
    except (OSError, ValueError) as exc:
        raise _load_error("transformer config", config_source, exc) from exc
    config["n_layers"] = n_layers
    try:
        with torch.device("meta"):
            model = ZImageTransformer2DModel.from_config(config)
        if quant:
            raise ModelLoadError("base_quantization: nf4 needs a diffusers Z-Image folder or hub id.",
                                 "Give base_model as a diffusers folder, or use fp8_base with the single file.")
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit the Z-Image config from '{config_source}': {exc}",
                             "Use the transformer file from models/diffusion_models (z_image_turbo_bf16.safetensors) "
                             "with a Z-Image config folder.") from exc
    return model.to(dtype).eval()


def load_text_encoder_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """Qwen3-4B from qwen_3_4b.safetensors (Qwen3ForCausalLM names, `model.` prefix; the LM head is dropped)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(config_source, subfolder="text_encoder", local_files_only=local_only(config_source))
    except (OSError, ValueError) as exc:
        raise _load_error("text encoder config", config_source, exc) from exc
    state = read_upcast(path, dtype)
    marker = "embed_tokens.weight"
    first = next((k for k in state if k.endswith(marker)), None)
    if first is None:
        raise ModelLoadError(f"'{Path(path).name}' is not a Qwen3 text encoder (no {marker}).",
                             "Use qwen_3_4b.safetensors from ComfyUI's models/text_encoders.")
    prefix = first[: -len(marker)]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit Z-Image's text encoder config: {exc}",
                             "Use qwen_3_4b.safetensors (Qwen3-4B), not another Qwen model.") from exc
    # Non-persistent buffers (the rotary frequencies) are not in the file: build them for real.
    if hasattr(model, "rotary_emb"):
        model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.to(dtype).eval()


def load_vae_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_single_file(read_upcast(path, dtype), config=config_source,
                                              subfolder=config_subfolder(config_source, "vae"), torch_dtype=dtype,
                                              local_files_only=local_only(config_source))
    except OSError as exc:
        raise _load_error("vae config", config_source, exc) from exc
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' is not FLUX's autoencoder: {exc}",
                             "Z-Image uses FLUX.1's ae.safetensors (16 latent channels).") from exc


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
    if file_has_fp8(path):
        model.notes.append(fp8_note(path, dtype))
    return model
