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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.families.dit.common import first_text_encoder_file
from core.families.dit.default import (TransformerSpec, draw_each, flow_scheduler, latent_call, place_for_tryout,
                                       timestep_sampling, transformer_family)
from core.family_api.registry import family_info
from core.families.dit.video_vae import decode_latents, denormalize_latents, encode_moments, normalize_latents
from core.families.krea2.loss import make_loss
from core.families.krea2.text import encode_entries, prompt_identity, stack


def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
    from core.families.krea2.load import load_model

    return load_model(cfg.base_model, config_source=cfg.base_model_config, text_encoder=first_text_encoder_file(cfg),
                      vae=cfg.vae, dtype=dtype, quantization_config=quantization_config)


def lora_targets(transformer: nn.Module, cfg: TrainConfig) -> list[str]:
    from core.families.krea2.load import lora_targets as targets

    return targets(transformer)


def read_lora(path: Path) -> Any:
    from core.families.krea2.lora_files import read_lora as read

    return read(path)


def write_kohya(model: Any, state: dict[str, torch.Tensor], path: Path, **kwargs: Any) -> Path:
    """The native file (ComfyUI and Krea2Pipeline both read it)."""
    from core.families.krea2.lora_files import write_native_file

    return write_native_file(state, path, variant=model.variant, **kwargs)


def write_diffusers(state: dict[str, torch.Tensor], folder: Path, **kwargs: Any) -> Path:
    from core.families.krea2.lora_files import write_diffusers_file

    return write_diffusers_file(state, folder, **kwargs)


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    from diffusers import Krea2Pipeline

    pipe = Krea2Pipeline(scheduler=flow_scheduler(model), vae=model.vae, text_encoder=model.text_encoder,
                         tokenizer=model.tokenizer, transformer=model.transformer if transformer is None else transformer,
                         text_encoder_select_layers=model.text_layers, is_distilled=model.distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[str]], Any] | None = None, dtype: torch.dtype = torch.float32
             ) -> list[Image.Image]:
    """One image per prompt from the same seed; `embeds`: cached encodings instead of Qwen3-VL.

    Krea2Pipeline's guidance is CFG for guidance > 0 (Turbo is used with 0). The VAE decodes in fp32.
    """
    from core.families.dit.flow import unpack_latents

    device = pipe.vae.device
    step = pipe.vae_scale_factor * pipe.patch_size

    def call_for(prompt: str) -> dict[str, Any]:
        kwargs = latent_call(steps=steps, guidance_scale=guidance, width=width, height=height, seed=seed)
        if embeds is None:
            kwargs.update(prompt=prompt, negative_prompt=negative_prompt or None)
        else:
            # Prompt and negative padded to one length: the pipeline builds one set of position ids for both.
            e, mask = embeds([prompt, negative_prompt or ""] if guidance > 0 else [prompt])
            e, mask = e.to(device, dtype), mask.to(device)
            kwargs.update(prompt_embeds=e[:1], prompt_embeds_mask=mask[:1])
            if guidance > 0:
                kwargs.update(negative_prompt_embeds=e[1:], negative_prompt_embeds_mask=mask[1:])
        return kwargs

    def decode(packed: torch.Tensor) -> list[Any]:
        return decode_latents(pipe.vae, unpack_latents(packed.float(), 2 * (height // step), 2 * (width // step)))

    return draw_each(pipe, prompts, call_for, decode, dtype=dtype)


def preview_guidance(cfg: TrainConfig, distilled: bool) -> float:
    """The configured guidance; for Turbo left at the config's default, 0 (no CFG: how Turbo is used)."""
    import dataclasses

    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "sample_guidance_scale")
    return 0.0 if distilled and cfg.sample_guidance_scale == default else cfg.sample_guidance_scale


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps,
                    guidance=preview_guidance(cfg, model.distilled), negative_prompt=cfg.sample_negative_prompt,
                    width=width, height=height, embeds=cached, dtype=dtype)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.krea2.load import load_model

    model = place_for_tryout(load_model(base_model, config_source=model_config, vae=vae), device, dtype)
    return build_pipeline(model), model


def _lora_files() -> Any:
    from core.families.krea2.lora_files import lora_file_format

    return lora_file_format()


def _detect(base_model: str) -> str | None:
    from core.families.krea2.load import detect

    return detect(base_model)


def vae_scale(model: Any) -> int:
    """The VAE's downscale (8 for the real Qwen-Image VAE; the tiny one's is smaller)."""
    return 2 ** len(model.vae.config.temperal_downsample)


def preview_size(model: Any, resolution: int) -> tuple[int, int]:
    """The training resolution in whole 2x2 latent patches, not below the family's floor (in 8x-VAE pixels)."""
    scale = vae_scale(model)
    floor = family_info(model.variant).sample_size_floor * scale // 8
    step = scale * 2
    side = max(step, max(resolution, floor) // step * step)
    return side, side


def _default_size(model: Any) -> int:
    return family_info(model.variant).native_resolution * vae_scale(model) // 8


SPEC = TransformerSpec(
    label="Krea 2", trains="Krea 2 trains the attention and MLP layers of every block and of the text fusion",
    encoders_note="Krea 2 always caches Qwen3-VL's outputs (the text encoder is freed before training).",
    load=load, lora_targets=lora_targets, make_loss=make_loss, read_lora=read_lora,
    write_kohya=write_kohya, write_diffusers=write_diffusers, encode_entries=encode_entries, stack=stack,
    prompt_identity=prompt_identity, lora_init=True,
    training_note=lambda model, cfg: f"{timestep_sampling(cfg, model.variant)} timestep sampling",
    fp8_cast_modulation=True)

KREA2 = transformer_family(SPEC, detect=_detect, lora_files=_lora_files(), previews=previews,
                           tryout_pipeline=tryout_pipeline, generate=generate, default_size=_default_size,
                           encode_moments=encode_moments, normalize_latents=normalize_latents,
                           denormalize_latents=denormalize_latents)
FAMILY = KREA2
