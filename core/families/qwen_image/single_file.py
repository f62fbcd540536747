"""Qwen-Image as ComfyUI users have it: one file per part.

The transformer in models/diffusion_models (qwen_image_bf16 / qwen_image_fp8_e4m3fn; diffusers' module
names, optionally under `model.diffusion_model.`; fp8 weights upcast, "scaled fp8" multiplied by their
`scale_weight`), Qwen2.5-VL in models/text_encoders (qwen_2.5_vl_7b / _fp8_scaled: Hugging Face's original
names, `model.layers.*` and `visual.*`) and the VAE in models/vae (qwen_image_vae: the Wan 2.1 VAE's names).
Configs and the tokenizer come from `config_source` (a diffusers folder or hub id), the Qwen/Qwen-Image
repo otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor

from core.hub import offline
from core.families.dit.video_vae import vae_key_to_wan, vae_to_comfy  # noqa: F401 (re-exported: tiny.py, tests)
from core.families.dit.weights import FP8_DTYPES
from core.families.qwen_image.load import HUB_CONFIGS, QwenModel, strip_prefix


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def dequantize(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """fp8 weights -> `dtype`; ComfyUI's scaled fp8 (`<w>.scale_weight`) multiplied back; markers dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith((".scale_weight", ".scale_input")) or key in ("scaled_fp8",):
            continue
        scale = state.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        value = value.float() * scale.float() if scale is not None else value
        out[key] = value.to(dtype) if value.is_floating_point() or value.dtype in FP8_DTYPES else value
    return out


def transformer_config_from_keys(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The QwenImageTransformer2DModel config of a state dict (the RoPE axes: Qwen-Image's own)."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    inner, in_channels = state["img_in.weight"].shape
    head_dim = int(state["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    return dict(patch_size=2, in_channels=int(in_channels), out_channels=int(state["proj_out.weight"].shape[0]) // 4,
                num_layers=max(blocks) + 1, attention_head_dim=head_dim, num_attention_heads=int(inner) // head_dim,
                joint_attention_dim=int(state["txt_in.weight"].shape[1]), guidance_embeds=False,
                axes_dims_rope=(16, 56, 56))


def _config_source(variant: str, config_source: str) -> str:
    return config_source or HUB_CONFIGS[variant]


def load_transformer_file(path: str | Path, *, variant: str, config_source: str = "", dtype: torch.dtype,
                          quantization_config: Any = None) -> Any:
    from diffusers import QwenImageTransformer2DModel

    raw = read_safetensors(path)
    state = dict(zip(strip_prefix(list(raw)), raw.values()))
    state = dequantize(state, dtype)
    source = _config_source(variant, config_source)
    try:
        config = dict(QwenImageTransformer2DModel.load_config(source, subfolder="transformer",
                                                              local_files_only=offline() or Path(source).is_dir()))
    except (OSError, ValueError):
        config = transformer_config_from_keys(state)
    with init_empty_weights(include_buffers=False):  # buffers (RoPE tables) are not in the files
        model = QwenImageTransformer2DModel.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"'{Path(path).name}' does not fit the Qwen-Image transformer: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    if quantization_config is not None:
        raise ValueError("NF4 loading of a single transformer file is not supported; use the diffusers folder "
                         "or hub id (Qwen/Qwen-Image) with base_quantization: nf4, or fp8_base.")
    return model.to(dtype)


def text_encoder_to_comfy(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers 5 Qwen2.5-VL names -> the original checkpoint's (`model.layers.*`, `visual.*`, `lm_head`)."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = key[len("model."):]
        out[key] = value
    return out


def text_encoder_from_comfy(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            key = "model.language_model." + key[len("model."):]
        out[key] = value
    return out


def load_text_encoder_file(path: str | Path, *, variant: str, config_source: str = "", dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    source = _config_source(variant, config_source)
    config = AutoConfig.from_pretrained(source, subfolder="text_encoder",
                                        local_files_only=offline() or Path(source).is_dir())
    state = text_encoder_from_comfy(dequantize(read_safetensors(path), dtype))
    with init_empty_weights(include_buffers=False):  # buffers (RoPE tables) are not in the files
        model = Qwen2_5_VLForConditionalGeneration(config)
    if "lm_head.weight" not in state:  # ComfyUI's files may leave the unused LM head out
        state["lm_head.weight"] = torch.zeros(model.lm_head.weight.shape, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"'{Path(path).name}' is not a Qwen2.5-VL text encoder file: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    return model.to(dtype).eval()


def load_vae_file(path: str | Path, *, config_source: str = "", variant: str = "qwen-image",
                  dtype: torch.dtype = torch.float32) -> Any:
    """A Qwen-Image VAE file: Wan 2.1 names (ComfyUI) or diffusers' names, or a diffusers VAE folder."""
    from diffusers import AutoencoderKLQwenImage

    path = Path(path)
    if path.is_dir():
        return AutoencoderKLQwenImage.from_pretrained(str(path), torch_dtype=dtype)
    source = _config_source(variant, config_source)
    try:
        config = dict(AutoencoderKLQwenImage.load_config(source, subfolder="vae",
                                                         local_files_only=offline() or Path(source).is_dir()))
    except (OSError, ValueError):
        config = {}
    with init_empty_weights(include_buffers=False):  # buffers (RoPE tables) are not in the files
        model = AutoencoderKLQwenImage.from_config(config)
    state = {k.removeprefix("first_stage_model.").removeprefix("vae."): v
             for k, v in dequantize(read_safetensors(path), torch.float32).items()}
    names = {vae_key_to_wan(k, model.config.num_res_blocks): k for k in model.state_dict()}
    state = {names.get(k, k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"'{path.name}' is not a Qwen-Image VAE file: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    return model.to(dtype).eval()


def _find(models: Path, folders: tuple[str, ...], patterns: tuple[str, ...]) -> Path | None:
    for folder in folders:
        base = models / folder
        if not base.is_dir():
            continue
        for pattern in patterns:
            found = sorted(base.glob(pattern))
            if found:
                return found[0]
    return None


def load_single_file(path: Path, *, variant: str, config_source: str = "", vae: str = "", text_encoder: str = "",
                     dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> QwenModel:
    """The transformer file plus Qwen2.5-VL and the VAE from ComfyUI's models/ folder (or the given files)."""
    from transformers import Qwen2Tokenizer

    from core.families.qwen_image.load import _scheduler_config

    models = path.parent.parent
    te_file = Path(text_encoder) if text_encoder else _find(
        models, ("text_encoders", "clip"), ("qwen_2.5_vl_7b*.safetensors", "qwen*2.5*vl*.safetensors"))
    vae_file = Path(vae) if vae else _find(models, ("vae",), ("qwen_image_vae*.safetensors", "qwen*vae*.safetensors"))
    if te_file is None or vae_file is None:
        missing = "qwen_2.5_vl_7b.safetensors (models/text_encoders)" if te_file is None else \
            "qwen_image_vae.safetensors (models/vae)"
        raise ValueError(f"{path.name} is a single transformer file; {missing} was not found beside it. "
                         "Put it there or give its path (text_encoder / vae).")
    source = _config_source(variant, config_source)
    local = offline() or Path(source).is_dir()
    tokenizer = Qwen2Tokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local)
    processor = None
    if variant != "qwen-image":
        from core.families.qwen_image.text import load_vl_processor

        processor = load_vl_processor(source, tokenizer, local)
    model = QwenModel(
        variant, load_transformer_file(path, variant=variant, config_source=config_source, dtype=dtype,
                                       quantization_config=quantization_config),
        load_vae_file(vae_file, config_source=config_source, variant=variant, dtype=dtype),
        load_text_encoder_file(te_file, variant=variant, config_source=config_source, dtype=dtype),
        tokenizer, processor,
        scheduler_config=_scheduler_config(source, local), source=str(path), is_single_file=True)
    model.notes.append(f"Text encoder {te_file.name}, VAE {vae_file.name}; configs from {source}")
    return model


