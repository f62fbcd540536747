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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.families.dit import folders
from core.families.dit.default import LoadedModel
from core.families.dit.folders import config_source_hint, part_error
from core.families.dit.single_files import has_marker, strip_model_prefix
from core.families.dit.weights import detect_source, read_json
from core.family_api.contract import ModelLoadError

VARIANTS = ("krea2", "krea2-turbo")
HUB_CONFIGS = {"krea2": "krea/Krea-2-Raw", "krea2-turbo": "krea/Krea-2-Turbo"}
MAX_SEQUENCE_LENGTH = 512
DEFAULT_TEXT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
# Native (ComfyUI / krea-ai) and diffusers tensor names only a Krea 2 transformer has.
NATIVE_MARKERS = ("txtfusion.projector.weight",)
DIFFUSERS_MARKERS = ("text_fusion.projector.weight",)
BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate", "ff.up", "ff.down")


@dataclass
class Krea2Model(LoadedModel):
    """The modules of a Krea 2 pipeline and what training needs to know about them."""

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any
    text_layers: tuple[int, ...] = DEFAULT_TEXT_LAYERS

    @property
    def distilled(self) -> bool:
        return self.variant == "krea2-turbo"


strip = strip_model_prefix


def is_krea2_keys(keys: Any) -> bool:
    return has_marker(keys, NATIVE_MARKERS + DIFFUSERS_MARKERS)


def variant_from_name(name: str) -> str:
    return "krea2-turbo" if "turbo" in name.lower() else "krea2"


def _variant_of_folder(path: Path, index: dict[str, Any]) -> str:
    if "is_distilled" in index:
        return "krea2-turbo" if index["is_distilled"] else "krea2"
    return variant_from_name(path.name)


def _folder_variant(path: Path, index: dict[str, Any], transformer: dict[str, Any]) -> str | None:
    if "Krea2" not in str(index.get("_class_name", "")) + str(transformer.get("_class_name", "")):
        return None
    return _variant_of_folder(path, index)


def detect(base_model: str) -> str | None:
    """"krea2" / "krea2-turbo" for a Krea 2 file, diffusers folder or hub id, else None."""
    return detect_source(base_model, fits=is_krea2_keys, file_variant=lambda path: variant_from_name(path.name),
                         folder_variant=_folder_variant,
                         hub_variant=lambda name: (variant_from_name(name) if any(
                             w in name.lower() for w in ("krea-2", "krea2", "krea_2")) else None))


# --- loading ------------------------------------------------------------------------------------------

def load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    return part_error("Krea 2", what, source, exc, config_source_hint("Krea 2"))


def scheduler_config(source: str) -> dict[str, Any]:
    return folders.scheduler_config(source, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                                             "base_image_seq_len": 256, "max_image_seq_len": 6400})


def tokenizer_of(source: str) -> Any:
    return folders.tokenizer_of(source, load_error)


def text_layers_of(source: str) -> tuple[int, ...]:
    index = read_json(Path(source) / "model_index.json") if Path(source).is_dir() else None
    layers = (index or {}).get("text_encoder_select_layers")
    return tuple(layers) if layers else DEFAULT_TEXT_LAYERS


def load_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> Krea2Model:
    """A diffusers Krea 2 folder or hub id, component by component, on the CPU."""
    from diffusers import AutoencoderKLQwenImage, Krea2Transformer2DModel
    from transformers import Qwen3VLModel

    transformer, text_encoder, vae = folders.load_parts(
        source, "Krea 2", dtype=dtype, quantization_config=quantization_config, transformer=Krea2Transformer2DModel,
        text_encoder=Qwen3VLModel, vae=AutoencoderKLQwenImage)
    path = Path(source)
    variant = (_variant_of_folder(path, read_json(path / "model_index.json") or {}) if path.is_dir()
               else variant_from_name(source))
    return Krea2Model(variant, transformer, vae, text_encoder, tokenizer_of(source), text_layers=text_layers_of(source),
                      scheduler_config=scheduler_config(source), source=str(source))


# Any Krea 2 source: a single .safetensors (ComfyUI layout), a diffusers folder or a hub id.
load_model = folders.source_loader(load_folder, "core.families.krea2.single_file")


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
