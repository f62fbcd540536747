"""Krea 2 (Raw and Turbo) behind the `ImageFamily` interface.

Built from `core.families.krea2.load` (loading), `.text` (Qwen3-VL prompts), `.loss` and `.lora_files` on the
transformer families' default (core.families.dit.default), with the Qwen-Image VAE's latents
(core.families.dit.video_vae). Qwen3-VL encodes every caption once into a disk cache and is freed; the LoRA goes
on the attention (q, k, v, gate, out) and MLP (gate, up, down) of every block and of the text-fusion blocks;
flow matching with logit-normal sampling (the reference trainer's).

Train on Raw (the base model): Turbo is step-distilled (fixed shift, few steps, no CFG), and a LoRA trained on it
directly loses the distillation; a Raw LoRA loads on Turbo (same shapes, one kind of file), so the Test tab draws
with it on Turbo. Previews during the run use the loaded model's regime (Raw: the configured steps and CFG).
"""
from __future__ import annotations

from typing import Any

import torch

from core.config import TrainConfig
from core.families.dit.default import (Draw, TransformerSpec, flow_scheduler, package_family, package_parts,
                                       pipeline_generate, unless_set)
from core.families.dit.video_vae import decode_latents, denormalize_latents, encode_moments, normalize_latents


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    from diffusers import Krea2Pipeline

    pipe = Krea2Pipeline(scheduler=flow_scheduler(model), vae=model.vae, text_encoder=model.text_encoder,
                         tokenizer=model.tokenizer, transformer=model.transformer if transformer is None else transformer,
                         text_encoder_select_layers=model.text_layers, is_distilled=model.distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_for(pipe: Any, draw: Draw, prompt: str) -> dict[str, Any]:
    """Krea2Pipeline's guidance is CFG for guidance > 0 (Turbo is used with 0)."""
    kwargs = draw.latents(guidance_scale=draw.guidance)
    if draw.embeds is None:
        kwargs.update(prompt=prompt, negative_prompt=draw.negative_prompt or None)
    else:
        # Prompt and negative padded to one length: the pipeline builds one set of position ids for both.
        cfg_on = draw.guidance > 0
        e, mask = draw.embeds([prompt, draw.negative_prompt or ""] if cfg_on else [prompt])
        e, mask = e.to(draw.device, draw.dtype), mask.to(draw.device)
        kwargs.update(prompt_embeds=e[:1], prompt_embeds_mask=mask[:1])
        if cfg_on:
            kwargs.update(negative_prompt_embeds=e[1:], negative_prompt_embeds_mask=mask[1:])
    return kwargs


def _decode(pipe: Any, packed: torch.Tensor, draw: Draw) -> list[Any]:
    """The pipeline's packed latents as images (the VAE in fp32)."""
    from core.families.dit.flow import unpack_latents

    step = pipe.vae_scale_factor * pipe.patch_size
    return decode_latents(pipe.vae, unpack_latents(packed.float(), 2 * (draw.height // step), 2 * (draw.width // step)))


generate = pipeline_generate(_call_for, _decode)


def preview_guidance(cfg: TrainConfig, distilled: bool) -> float:
    """The configured guidance; for Turbo left at the config's default, 0 (no CFG: how Turbo is used)."""
    return unless_set(cfg, "sample_guidance_scale", 0.0) if distilled else cfg.sample_guidance_scale


SPEC = TransformerSpec(
    label="Krea 2", trains="Krea 2 trains the attention and MLP layers of every block and of the text fusion",
    encoders_note="Krea 2 always caches Qwen3-VL's outputs (the text encoder is freed before training).",
    # Its WebUI / ComfyUI file is the native one (ComfyUI and Krea2Pipeline both read it).
    **package_parts("core.families.krea2", kohya_file="write_native_file"), lora_init=True,
    fp8_cast_modulation=True)

KREA2 = package_family(SPEC, "core.families.krea2", build_pipeline=build_pipeline, generate=generate,
                       settings=lambda model, cfg: {"guidance": preview_guidance(cfg, model.distilled)},
                       encode_moments=encode_moments, normalize_latents=normalize_latents,
                       denormalize_latents=denormalize_latents)
FAMILY = KREA2
