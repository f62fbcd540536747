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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.families.dit.default import (TransformerSpec, draw_each, flow_scheduler, latent_call, place_for_tryout, preview_size,
                                       sample_settings, timestep_sampling, transformer_family)
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


def _lora_targets(transformer: nn.Module, cfg: TrainConfig) -> list[str]:
    return lora_targets(transformer)


# --- before loading ------------------------------------------------------------------------------

def describe(model: Any) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    name = {"medium": "SD3 Medium", "5-medium": "SD3.5 Medium", "5-large": "SD3.5 Large"}[model.model_type]
    return [f"Model: {name} ({layout}), flow matching", *model.notes]


def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
    from core.families.sd3.load import load_sd3_model

    return load_sd3_model(cfg.base_model, config_source=cfg.base_model_config, vae=cfg.vae,
                          text_encoder_files=cfg.text_encoder_files, dtype=dtype, quantization_config=quantization_config)


def read_lora(path: Path) -> Any:
    from core.families.sd3.lora_files import read_lora as read

    return read(path)


def training_note(model: Any, cfg: TrainConfig) -> str:
    return (f"{timestep_sampling(cfg, model.variant)} timestep sampling (shift {flow_shift(cfg):g}), x0-preconditioned "
            "loss as diffusers' and sd-scripts' SD3 trainers")


def write_kohya(model: Any, state: dict[str, torch.Tensor], path: Path, **kwargs: Any) -> Path:
    """sd-scripts' SD3 names and metadata."""
    from core.families.sd3.lora_files import write_kohya_file

    return write_kohya_file(state, path, model_type=model.model_type, **kwargs)


def write_diffusers(state: dict[str, torch.Tensor], folder: Path, **kwargs: Any) -> Path:
    from core.families.sd3.lora_files import write_diffusers_file

    return write_diffusers_file(state, folder, **kwargs)


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


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[str]], Any] | None = None, dtype: torch.dtype = torch.float32
             ) -> list[Image.Image]:
    """One image per prompt from the same seed (real CFG); `embeds`: cached encodings instead of the encoders."""
    from core.sample import decode_fp32

    device = pipe.vae.device

    def call_for(prompt: str) -> dict[str, Any]:
        kwargs = latent_call(steps=steps, guidance_scale=guidance, width=width, height=height, seed=seed)
        if embeds is None:
            kwargs.update(prompt=prompt, negative_prompt=negative_prompt or "")
        else:
            e = embeds([prompt]).to(device, dtype)
            n = embeds([negative_prompt or ""]).to(device, dtype)
            kwargs.update(prompt_embeds=e.prompt_embeds, pooled_prompt_embeds=e.pooled,
                          negative_prompt_embeds=n.prompt_embeds, negative_pooled_prompt_embeds=n.pooled)
        return kwargs

    return draw_each(pipe, prompts, call_for, lambda latents: decode_fp32(pipe.vae, latents), dtype=dtype)


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution, model.transformer.config.patch_size)
    return generate(pipe, cfg.sample_prompts, **sample_settings(cfg), width=width, height=height, embeds=cached,
                    dtype=dtype)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.sd3.load import load_sd3_model

    model = place_for_tryout(load_sd3_model(base_model, config_source=model_config, vae=vae), device, dtype)
    pipe = build_pipeline(model)
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


def detect(base_model: str) -> str | None:
    from core.families.sd3.load import detect as detect_sd3

    return detect_sd3(base_model)


def _lora_files() -> Any:
    from core.families.sd3.lora_files import lora_file_format

    return lora_file_format()


SPEC = TransformerSpec(
    label="SD3", trains="SD3 trains every block's attention and MLP",
    encoders_note="SD3 always caches the text encoders' outputs (T5-XXL is too large to keep).",
    load=load, lora_targets=_lora_targets, make_loss=make_loss, read_lora=read_lora,
    write_kohya=write_kohya, write_diffusers=write_diffusers, encode_entries=encode_entries, stack=stack,
    prompt_identity=prompt_identity, training_note=training_note, lora_init="gaussian", fp8_cast_modulation=True,
    extra_metadata=extra_metadata)

FAMILY = transformer_family(SPEC, detect=detect, lora_files=_lora_files(), describe=describe, previews=previews,
                            tryout_pipeline=tryout_pipeline, generate=generate)
