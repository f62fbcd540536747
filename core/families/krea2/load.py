"""Krea 2 (Raw and Turbo): detection, loading and the LoRA targets (prompts: `text`, the loss: `loss`).

Krea 2 is a single-stream DiT (`Krea2Transformer2DModel`: 28 blocks of width 6144 with grouped-query
attention and a gated output, SwiGLU MLPs) over the Qwen-Image VAE (16 channels, 2x2 patches), conditioned
on Qwen3-VL-4B: the hidden states of 12 of its layers are stacked per token and fused by the transformer's
own small text-fusion stack (`txtfusion`). Facts read from diffusers 0.42 (`Krea2Pipeline`):

- Prompt: the Qwen-Image chat template padded in the middle to 512 tokens ([prefix | prompt | PAD | suffix]),
  positions counting real tokens only, the system prefix dropped; a boolean mask marks the real tokens.
- The transformer's time input is sigma (1 = noise) and it predicts the velocity noise - x0.
- Latents: the VAE's sample, normalized per channel by `latents_mean` / `latents_std` (core.families.dit.video_vae).
- Raw (the base model; `is_distilled: false`) and Turbo (step-distilled, fixed shift mu = 1.15) share every
  shape: the name ("turbo") or model_index.json's `is_distilled` tells them apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.families.dit.weights import local_only, read_json, safetensors_keys
from core.family_api.contract import ModelLoadError

VARIANTS = ("krea2", "krea2-turbo")
HUB_CONFIGS = {"krea2": "krea/Krea-2-Raw", "krea2-turbo": "krea/Krea-2-Turbo"}
MAX_SEQUENCE_LENGTH = 512
DEFAULT_TEXT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
# Native (ComfyUI / krea-ai) and diffusers tensor names only a Krea 2 transformer has.
NATIVE_MARKERS = ("txtfusion.projector.weight",)
DIFFUSERS_MARKERS = ("text_fusion.projector.weight",)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate", "ff.up", "ff.down")


@dataclass
class Krea2Model:
    """The modules of a Krea 2 pipeline and what training needs to know about them."""

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str
    text_layers: tuple[int, ...] = DEFAULT_TEXT_LAYERS
    is_single_file: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def distilled(self) -> bool:
        return self.variant == "krea2-turbo"


def strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_krea2_keys(keys: Any) -> bool:
    names = {strip(k) for k in keys}
    return any(m in names for m in NATIVE_MARKERS + DIFFUSERS_MARKERS)


def variant_from_name(name: str) -> str:
    return "krea2-turbo" if "turbo" in name.lower() else "krea2"


def _variant_of_folder(path: Path, index: dict[str, Any]) -> str:
    if "is_distilled" in index:
        return "krea2-turbo" if index["is_distilled"] else "krea2"
    return variant_from_name(path.name)


def detect(base_model: str) -> str | None:
    """"krea2" / "krea2-turbo" for a Krea 2 file, diffusers folder or hub id, else None."""
    path = Path(base_model)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return None
        return variant_from_name(path.name) if is_krea2_keys(safetensors_keys(path)) else None
    if path.is_dir():
        index = read_json(path / "model_index.json") or {}
        transformer = read_json(path / "transformer" / "config.json") or read_json(path / "config.json") or {}
        if "Krea2" not in str(index.get("_class_name", "")) + str(transformer.get("_class_name", "")):
            return None
        return _variant_of_folder(path, index)
    if base_model.lower().endswith(".safetensors") or "/" not in base_model:
        return None
    if any(w in base_model.lower() for w in ("krea-2", "krea2", "krea_2")):
        return variant_from_name(base_model)
    return None


# --- loading ------------------------------------------------------------------------------------------

def load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"The Krea 2 {what} could not be loaded from '{source}': {exc}",
        "A single-file Krea 2 needs base_model_config: a diffusers Krea 2 folder (model_index.json and the "
        "transformer/, text_encoder/, tokenizer/, vae/, scheduler/ configs; the weights are not needed), or the "
        "hub id downloaded once with internet access.")


def scheduler_config(source: str) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler",
                                                                local_files_only=local_only(source)))
    except (OSError, ValueError):
        return {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 6400}


def tokenizer_of(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only(source))
    except (OSError, ValueError) as exc:
        raise load_error("tokenizer", source, exc) from exc


def text_layers_of(source: str) -> tuple[int, ...]:
    index = read_json(Path(source) / "model_index.json") if Path(source).is_dir() else None
    layers = (index or {}).get("text_encoder_select_layers")
    return tuple(layers) if layers else DEFAULT_TEXT_LAYERS


def load_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> Krea2Model:
    """A diffusers Krea 2 folder or hub id, component by component, on the CPU."""
    from diffusers import AutoencoderKLQwenImage, Krea2Transformer2DModel
    from transformers import Qwen3VLModel

    kw = {"local_files_only": local_only(source)}
    quant = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        transformer = Krea2Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype,
                                                              **kw, **quant)
        text_encoder = Qwen3VLModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw).eval()
        vae = AutoencoderKLQwenImage.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{source}' is not a loadable Krea 2 diffusers folder or hub id: {exc}",
                             "A diffusers Krea 2 folder has model_index.json and transformer/, text_encoder/, "
                             "tokenizer/, vae/ and scheduler/.") from exc
    path = Path(source)
    variant = (_variant_of_folder(path, read_json(path / "model_index.json") or {}) if path.is_dir()
               else variant_from_name(source))
    return Krea2Model(variant, transformer, vae, text_encoder, tokenizer_of(source), scheduler_config(source),
                      str(source), text_layers=text_layers_of(source))


def load_model(base_model: str, *, config_source: str = "", text_encoder: str = "", vae: str = "",
               dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> Krea2Model:
    """Any Krea 2 source: a single .safetensors (ComfyUI layout), a diffusers folder or a hub id."""
    from core.families.krea2.single_file import load_single_file, load_vae_file

    if Path(base_model).is_file():
        return load_single_file(base_model, config_source=config_source, text_encoder=text_encoder, vae=vae,
                                dtype=dtype, quantization_config=quantization_config)
    model = load_folder(base_model, dtype=dtype, quantization_config=quantization_config)
    if vae:
        model.vae = load_vae_file(vae, config_source=base_model, dtype=dtype)
        model.notes.append(f"VAE: {Path(vae).name}")
    return model


def lora_targets(transformer: torch.nn.Module) -> list[str]:
    """The attention (q, k, v, gate, out) and MLP (gate, up, down) Linears of every block and of the
    text-fusion blocks (`txtfusion`)."""
    out = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        inner = ".".join(parts[3:] if parts[0] == "text_fusion" else parts[2:])  # text_fusion.<stack>.N.<inner>
        if parts[0] in ("transformer_blocks", "text_fusion") and inner in BLOCK_TARGETS:
            out.append(name)
    return out
