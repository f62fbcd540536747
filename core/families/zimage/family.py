"""Z-Image (Turbo and base) behind the `ImageFamily` interface.

Built from `core.families.zimage.load` (loading), `.text` (Qwen3 prompts), `.loss` and
`.lora_files` (files) on the transformer families' default (core.families.dit.default).
Qwen3-4B encodes every caption once into a disk
cache and is freed before the transformer trains; the LoRA goes on the attention + MLP Linears
of all 34 blocks (30 layers, 2 noise- and 2 context-refiners); flow matching with the
configured sampling (default: shift); fp8 storage, gradient checkpointing and block offload
are the transformer families' shared ones (core.families.dit).

Turbo is step-distilled (8 steps, no CFG). ai-toolkit trains it with a de-distilling "training
adapter" LoRA merged in while training and left out at inference; musubi-tuner and OneTrainer
train plain LoRA. We train plain LoRA on either (short runs on Turbo keep its few-step
behaviour); previews use the model's own regime: Turbo 8 steps without CFG, base with CFG.
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.families.dit.common import first_text_encoder_file
from core.families.dit.default import (Draw, TransformerSpec, fixed_targets, flow_scheduler, kohya_writer, lazy,
                                       pipeline_generate, place_for_tryout, preview_size, timestep_sampling, transformer_family)
from core.families.zimage.loss import make_loss
from core.families.zimage.text import encode_entries, prompt_identity, stack


def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
    from core.families.zimage.load import load_model

    # Z-Image has one text encoder: the first (only) file of `text_encoder_files`.
    return load_model(cfg.base_model, config_source=cfg.base_model_config, text_encoder=first_text_encoder_file(cfg),
                      vae=cfg.vae, dtype=dtype, quantization_config=quantization_config)


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    from diffusers import ZImagePipeline

    scheduler = flow_scheduler(model)
    pipe = ZImagePipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                          tokenizer=model.tokenizer, transformer=model.transformer if transformer is None else transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_for(pipe: Any, draw: Draw, prompt: str) -> dict[str, Any]:
    """ZImagePipeline's guidance is real CFG (guidance_scale > 0 runs the negative prompt too; Turbo is used
    with 0); its prompt encodings are a list, one tensor per prompt."""
    kwargs = draw.latents(guidance_scale=draw.guidance)
    if draw.embeds is None:
        kwargs.update(prompt=prompt, negative_prompt=draw.negative_prompt or None)
    else:
        kwargs["prompt_embeds"] = [e.to(draw.device, draw.dtype) for e in draw.embeds([prompt])]
        if draw.guidance > 0:
            kwargs["negative_prompt_embeds"] = [e.to(draw.device, draw.dtype)
                                                for e in draw.embeds([draw.negative_prompt or ""])]
    return kwargs


generate = pipeline_generate(_call_for)


def preview_guidance(cfg: TrainConfig, variant: str) -> float:
    """The configured guidance; for Turbo left at the config's default, 0 (no CFG: how Turbo is used)."""
    import dataclasses

    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "sample_guidance_scale")
    if variant == "z-image-turbo" and cfg.sample_guidance_scale == default:
        return 0.0
    return cfg.sample_guidance_scale


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps,
                    guidance=preview_guidance(cfg, model.variant), negative_prompt=cfg.sample_negative_prompt,
                    width=width, height=height, embeds=cached, dtype=dtype)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.zimage.load import load_model

    model = place_for_tryout(load_model(base_model, config_source=model_config, vae=vae), device, dtype)
    return build_pipeline(model), model


_FILES = "core.families.zimage.lora_files"
_LOAD = "core.families.zimage.load"


SPEC = TransformerSpec(
    label="Z-Image", trains="Z-Image trains the attention and MLP layers of every block",
    encoders_note="Z-Image always caches Qwen3's outputs (the 4B text encoder is freed before training).",
    load=load, lora_targets=fixed_targets(_LOAD, "lora_targets"), make_loss=make_loss, read_lora=lazy(_FILES, "read_lora"),
    write_kohya=kohya_writer(_FILES, "write_kohya_file"), write_diffusers=lazy(_FILES, "write_diffusers_file"),
    encode_entries=encode_entries, stack=stack,
    prompt_identity=prompt_identity, lora_init=True,
    training_note=lambda model, cfg: f"{timestep_sampling(cfg, model.variant)} timestep sampling",
    # diffusers' default skips (norms, and Z-Image's own t_embedder / cap_embedder) already cast the
    # adaLN modulation Linears: its names hold no "norm".
    fp8_cast_modulation=False)

ZIMAGE = transformer_family(SPEC, detect=lazy(_LOAD, "detect"), lora_files=lazy(_FILES, "lora_file_format")(), previews=previews,
                            tryout_pipeline=tryout_pipeline, generate=generate)
FAMILY = ZIMAGE
