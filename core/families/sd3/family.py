"""Stable Diffusion 3 / 3.5 (medium, large) behind the `ImageFamily` interface.

Loading: a diffusers folder / hub id or ComfyUI's single files (`sd3_load`). Prompts: CLIP-L + CLIP-G
(penultimate hidden states and pooled projections) and T5-XXL (256 tokens; optional), encoded once as
StableDiffusion3Pipeline.encode_prompt does, cached on disk, and the encoders freed (sample prompts and
the negative prompt included, so previews need no text encoder). Training objective: the reference
default of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, which sd-scripts'
sd3_train_network.py shares: sigma = shift(sigmoid(N(0, 1))) with the scheduler's shift 3.0
("logit_normal" weighting scheme, mean 0, std 1, through FlowMatchEulerDiscreteScheduler(shift=3.0)),
x_sigma = (1 - sigma) x0 + sigma noise, the output preconditioned to an x0 estimate
(`precondition_outputs=1`: x_sigma - sigma * v) against x0, MSE with weight 1. LoRA on the attention and
MLP Linears of every joint block (both streams, SD3.5 medium's second attention too). Files: sd-scripts'
MMDiT kohya names (`sd3_lora_files`) and diffusers' `pytorch_lora_weights.safetensors`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.families.dit.default import (Draw, TransformerSpec, flow_scheduler, kohya_writer, lazy, pipeline_generate,
                                       tryout_loader, preview_size, sample_settings, timestep_sampling,
                                       transformer_family)
from core.families.sd3.loss import flow_shift, make_loss
from core.families.sd3.text import encode_entries, prompt_identity, stack

# Linears inside transformer_blocks.N that get LoRA: attention (both streams, attn2 where present) and MLPs.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def lora_targets(transformer: nn.Module) -> list[str]:
    """Full module names of the block Linears that get LoRA (exact names for PEFT's `target_modules`)."""
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "transformer_blocks" and parts[2] in LORA_TARGETS \
                and isinstance(module, nn.Linear):
            names.append(name)
    return names


# --- before loading ------------------------------------------------------------------------------

def describe(model: Any) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    name = {"medium": "SD3 Medium", "5-medium": "SD3.5 Medium", "5-large": "SD3.5 Large"}[model.model_type]
    return [f"Model: {name} ({layout}), flow matching", *model.notes]


def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
    from core.families.sd3.load import load_sd3_model

    # A diffusers folder's transformer loads after the prompts and latents are cached and the encoders freed.
    return load_sd3_model(cfg.base_model, config_source=cfg.base_model_config, vae=cfg.vae,
                          text_encoder_files=cfg.text_encoder_files, dtype=dtype, quantization_config=quantization_config,
                          defer_transformer=True)


def training_note(model: Any, cfg: TrainConfig) -> str:
    return (f"{timestep_sampling(cfg, model.variant)} timestep sampling (shift {flow_shift(cfg):g}), x0-preconditioned "
            "loss as diffusers' and sd-scripts' SD3 trainers")


def extra_metadata(cfg: TrainConfig) -> dict[str, str]:
    return dict(ss_weighting_scheme="logit_normal", ss_logit_mean="0.0", ss_logit_std="1.0",
                ss_discrete_flow_shift=format(flow_shift(cfg), "g"))


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    from diffusers import StableDiffusion3Pipeline

    scheduler = flow_scheduler(model)
    pipe = StableDiffusion3Pipeline(
        scheduler=scheduler, vae=model.vae, transformer=model.transformer if transformer is None else transformer,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2, text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_for(pipe: Any, draw: Draw, prompt: str) -> dict[str, Any]:
    """Real CFG; the cached encodings carry the pooled projections too."""
    kwargs = draw.latents(guidance_scale=draw.guidance)
    if draw.embeds is None:
        kwargs.update(prompt=prompt, negative_prompt=draw.negative_prompt or "")
    else:
        e, n = draw.encoded(prompt), draw.encoded(draw.negative_prompt or "")
        kwargs.update(prompt_embeds=e.prompt_embeds, pooled_prompt_embeds=e.pooled,
                      negative_prompt_embeds=n.prompt_embeds, negative_pooled_prompt_embeds=n.pooled)
    return kwargs


generate = pipeline_generate(_call_for)


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution, model.transformer.config.patch_size)
    return generate(pipe, cfg.sample_prompts, **sample_settings(cfg), width=width, height=height, embeds=cached,
                    dtype=dtype)


_tryout_pipeline = tryout_loader("core.families.sd3.load", build_pipeline, "load_sd3_model")


def tryout_pipeline(base_model: str, **where: Any) -> tuple[Any, Any]:
    pipe, model = _tryout_pipeline(base_model, **where)
    pipe.load_lora_weights = _reading_every_form(pipe.load_lora_weights)
    return pipe, model


def _reading_every_form(load: Callable[..., Any]) -> Callable[..., Any]:
    """`load_lora_weights` that also takes our WebUI / ComfyUI file (sd-scripts' MMDiT names), which
    diffusers' SD3 loader has no converter for: it gets the diffusers-named state, alpha / rank folded
    into lora_B (diffusers then assumes alpha = rank, so the delta is the file's)."""

    def load_any(source: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source, (str, Path)) and Path(source).is_file():
            from safetensors import safe_open

            with safe_open(str(source), "pt") as handle:
                native = any(k.startswith(("lora_unet_", "diffusion_model.")) for k in handle.keys())
            if native:
                from core.families.sd3.lora_files import read_lora

                peft, alphas, _ = read_lora(source)
                state = {}
                for key, value in peft.items():
                    module = key.rsplit(".lora_", 1)[0]
                    if key.endswith("lora_B.weight"):
                        value = value * (alphas[module] / peft[f"{module}.lora_A.weight"].shape[0])
                    state[f"transformer.{key}"] = value
                source = state
        return load(source, *args, **kwargs)

    return load_any


_FILES = "core.families.sd3.lora_files"


SPEC = TransformerSpec(
    label="SD3", trains="SD3 trains every block's attention and MLP",
    encoders_note="SD3 always caches the text encoders' outputs (T5-XXL is too large to keep).",
    load=load, lora_targets=lambda transformer, cfg: lora_targets(transformer), make_loss=make_loss,
    read_lora=lazy(_FILES, "read_lora"), write_kohya=kohya_writer(_FILES, "write_kohya_file", "model_type"),
    write_diffusers=lazy(_FILES, "write_diffusers_file"), encode_entries=encode_entries, stack=stack,
    prompt_identity=prompt_identity, training_note=training_note, lora_init="gaussian", fp8_cast_modulation=True,
    extra_metadata=extra_metadata)

FAMILY = transformer_family(SPEC, detect=lazy("core.families.sd3.load", "detect"),
                            lora_files=lazy(_FILES, "lora_file_format")(), describe=describe, previews=previews,
                            tryout_pipeline=tryout_pipeline, generate=generate)
