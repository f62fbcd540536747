"""FLUX.1-dev / schnell and Chroma behind the `ImageFamily` interface.

Built from the family's building blocks (`core.families.flux`): loading a diffusers folder,
hub id or ComfyUI single file; CLIP-L + T5 (Chroma: T5 with its mask) encoded once into a
disk cache and then freed, sample prompts included, so previews need no text encoder;
flow-matching loss with the configured timestep sampling, shift and guidance; LoRA on the
transformer blocks of `lora_blocks`, then fp8 storage / gradient checkpointing / block
offload; the LoRA written in BFL kohya names (WebUI, Forge, ComfyUI) and as diffusers'
`pytorch_lora_weights.safetensors`.
"""
from __future__ import annotations

from collections.abc import Iterable, Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.hub import offline
from core.config import TrainConfig
from core.family_api.contract import Batch
from core.family_api.registry import family_info
from core.families.dit.default import (Draw, TransformerSpec, flow_scheduler, kohya_writer, lazy, pipeline_generate,
                                       tryout_loader, preview_size, sample_settings, transformer_family)


def timestep_sampling(cfg: TrainConfig, variant: str) -> str:
    """The configured sampling, or the family's (`auto`): shift for FLUX.1, sigmoid for Chroma."""
    if cfg.timestep_sampling != "auto":
        return cfg.timestep_sampling
    return family_info(variant).default_timestep_sampling


def train_guidance(cfg: TrainConfig, variant: str) -> float | None:
    """The guidance input while training: FLUX.1-dev only (schnell and Chroma have none)."""
    return cfg.train_guidance if family_info(variant).has_guidance_embedding else None


# --- before loading ------------------------------------------------------------------------------

def detect(base_model: str) -> str | None:
    """"flux-dev" / "flux-schnell" / "chroma" for a FLUX-family file, folder or cached hub id; else None."""
    from core.families.flux.load import detect_variant

    variant = detect_variant(base_model)
    if variant is None and not Path(base_model).exists() and not base_model.lower().endswith(".safetensors"):
        variant = _hub_variant(base_model)
    return variant


def variant_from_keys(keys: Iterable[str]) -> str | None:
    """"flux-dev" / "flux-schnell" / "chroma" from a single file's tensor names (its header alone)."""
    from core.families.flux.load import variant_from_keys as from_keys

    return from_keys(keys)


def _hub_variant(repo: str) -> str | None:
    """A hub id's FLUX variant from its (cached) model_index.json and transformer config, else None."""
    from diffusers import DiffusionPipeline

    from core.families.flux.load import variant_from_folder_configs

    try:
        index = dict(DiffusionPipeline.load_config(repo, local_files_only=offline()))
    except Exception:  # noqa: BLE001 - not a reachable pipeline: the SD loader reports what is wrong with it
        return None
    if not any(word in str(index.get("_class_name", "")) for word in ("Flux", "Chroma")) or \
            "Flux2" in str(index.get("_class_name", "")):
        return None
    try:
        transformer = dict(DiffusionPipeline.load_config(repo, subfolder="transformer", local_files_only=offline()))
    except (OSError, ValueError):
        transformer = {}
    return variant_from_folder_configs(index, transformer)


def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
    from core.families.flux.load import load_flux_model

    model = load_flux_model(cfg.base_model, config_source=cfg.base_model_config, clip_l=cfg.clip_l, t5=cfg.t5,
                            vae=cfg.vae, dtype=dtype, quantization_config=quantization_config,
                            defer_transformer=True)
    if cfg.vae and not model.is_single_file:
        # A diffusers folder brings its own AE; `vae:` replaces it (the single-file loader took it already).
        from core.families.flux.single_file import load_vae_file

        model.vae = load_vae_file(cfg.vae, config_source=cfg.base_model_config or cfg.base_model,
                                  variant=model.variant, dtype=dtype)
        model.notes.append(f"AE from {cfg.vae}")
    return model


# --- prompts ---------------------------------------------------------------------------------------

def _caption(key: Any) -> str:
    """A prompt key's caption: FLUX.1 Kontext's keys are (caption, control path); its text encoders see only text."""
    return key[0] if isinstance(key, tuple) else key


def encode_entries(model: Any, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
    from core.families.flux.text import MAX_SEQUENCE_LENGTH, encode_prompts as encode

    return encode(model.text_encoder, model.tokenizer, model.text_encoder_2, model.tokenizer_2, captions,
                  max_sequence_length=MAX_SEQUENCE_LENGTH[model.variant], chroma=model.variant == "chroma").entries()


def prompt_identity(model: Any) -> str:
    """Both encoders' fingerprints, the T5 length, the variant."""
    from core.families.dit.prompt_cache import encoder_identity
    from core.families.flux.text import MAX_SEQUENCE_LENGTH

    return encoder_identity(model.text_encoder, model.text_encoder_2,
                            settings=f"{model.variant}|{MAX_SEQUENCE_LENGTH[model.variant]}")


# --- LoRA ------------------------------------------------------------------------------------------

def lora_targets(transformer: nn.Module, cfg: TrainConfig) -> list[str]:
    """The transformer blocks' Linears of the `lora_blocks` preset."""
    from core.families.flux.lora import flux_lora_targets

    return flux_lora_targets(transformer, cfg.lora_blocks)


def check_continued(model: Any, paths: list[str]) -> None:
    from core.families.flux.lora_files import check_modules_match_variant

    check_modules_match_variant(paths, model.variant)


def training_note(model: Any, cfg: TrainConfig) -> str:
    guidance = train_guidance(cfg, model.variant)
    return (f"{timestep_sampling(cfg, model.variant)} timestep sampling, "
            f"{'guidance ' + format(guidance, 'g') if guidance is not None else 'no guidance input'}")


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """Flow matching with the configured sampling, shift and guidance."""
    from core.families.flux.loss import FluxBatch, flux_loss

    sampling = timestep_sampling(cfg, model.variant)
    guidance = train_guidance(cfg, model.variant)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return flux_loss(transformer, FluxBatch(batch.latents, batch.cond, batch.control), timestep_sampling=sampling,
                         shift=cfg.discrete_flow_shift, guidance=guidance, dtype=dtype)

    return loss


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    """FluxPipeline / ChromaPipeline over the model's modules (text encoders may be freed: None)."""
    from diffusers import ChromaPipeline, FluxKontextPipeline, FluxPipeline

    scheduler = flow_scheduler(model)
    transformer = model.transformer if transformer is None else transformer
    if model.variant == "chroma":
        pipe = ChromaPipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder_2,
                              tokenizer=model.tokenizer_2, transformer=transformer)
    else:
        # FLUX.1 Kontext's pipeline also makes images from text alone (no image given).
        kind = FluxKontextPipeline if model.variant == "flux-kontext" else FluxPipeline
        pipe = kind(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                            tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
                            tokenizer_2=model.tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _decode(pipe: Any, packed: torch.Tensor, draw: Draw) -> list[Image.Image]:
    from core.families.dit.flow import unpack_latents
    from core.sample import decode_fp32

    # The pipeline rounds the size down to whole 2x2 latent patches (FluxPipeline._unpack_latents).
    step = pipe.vae_scale_factor * 2
    return decode_fp32(pipe.vae, unpack_latents(packed, 2 * (draw.height // step), 2 * (draw.width // step)))


def _call_for(pipe: Any, draw: Draw, prompt: str, control: Any = None) -> dict[str, Any]:
    """FLUX.1's `guidance` is its distilled guidance input; Chroma's is real CFG (with its T5 masks). Kontext
    (the Test tab): `control`, the image to edit (the first of a list)."""
    chroma = type(pipe).__name__.startswith("Chroma")
    kwargs = draw.latents(guidance_scale=draw.guidance)
    if control:
        kwargs["image"] = control[0] if isinstance(control, (list, tuple)) else control
    if draw.embeds is None:
        kwargs["prompt"] = prompt
        if chroma:
            kwargs["negative_prompt"] = draw.negative_prompt or ""
        return kwargs
    e = draw.encoded(prompt)
    kwargs["prompt_embeds"] = e.prompt_embeds
    if chroma:
        neg = draw.encoded(draw.negative_prompt or "")
        # ChromaPipeline's own masks are in the embeddings' dtype (it builds them so).
        kwargs.update(prompt_attention_mask=e.attention_mask.to(draw.dtype), negative_prompt_embeds=neg.prompt_embeds,
                      negative_prompt_attention_mask=neg.attention_mask.to(draw.dtype))
    else:
        kwargs["pooled_prompt_embeds"] = e.pooled
    return kwargs


generate = pipeline_generate(_call_for, _decode)


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    """Previews with the transformer being trained, from the cached prompt encodings (none for Kontext:
    an edit needs an image to edit)."""
    if family_info(model.variant).needs_control:
        return []
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    return generate(pipe, cfg.sample_prompts, **sample_settings(cfg), width=width, height=height, embeds=cached,
                    dtype=dtype)


# (FluxPipeline or ChromaPipeline, FluxModel) of a model on the Test tab's device.
tryout_pipeline = tryout_loader("core.families.flux.load", build_pipeline, "load_flux_model")


def _lora_files() -> Any:
    from core.family_api.contract import LoraFileFormat
    from core.families.flux import tools_files as flux_files

    return LoraFileFormat(to_kohya=flux_files.read_flux_kohya_tensors, write_kohya=flux_files.write_flux_kohya,
                          write_diffusers=flux_files.write_flux_diffusers, to_peft=flux_files.read_flux_peft)


def _stack(entries: list[dict[str, torch.Tensor]]) -> Any:
    from core.families.flux.text import stack_embeds

    return stack_embeds(entries)


_FILES = "core.families.flux.lora_files"

SPEC = TransformerSpec(
    label="FLUX / Chroma", trains="FLUX uses lora_blocks",
    encoders_note="FLUX / Chroma always cache the text encoders' outputs (T5-XXL is too large to keep).",
    load=load, lora_targets=lora_targets, make_loss=make_loss,
    read_lora=lambda path: lazy(_FILES, "read_flux_lora")(path, ignore_text_encoders=True),
    write_kohya=kohya_writer(_FILES, "write_flux_kohya_file"), write_diffusers=lazy(_FILES, "write_flux_diffusers_file"),
    encode_entries=encode_entries,
    stack=_stack, prompt_identity=prompt_identity, training_note=training_note, lora_init="gaussian",
    # The modulation Linears too (about 3.2B of FLUX.1's 11.9B), as kohya's fp8_base does and as the
    # memory estimate counts; diffusers' default skip pattern would keep them in bf16.
    fp8_cast_modulation=True, check_continued=check_continued, prompt_key=_caption)

FLUX = transformer_family(
    SPEC, detect=detect, lora_files=_lora_files(), previews=previews, tryout_pipeline=tryout_pipeline,
    generate=generate, variant_from_keys=variant_from_keys)

FAMILY = FLUX  # what the registry row's `impl` names
