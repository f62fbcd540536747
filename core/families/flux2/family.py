"""FLUX.2 klein (4B / 9B, base and distilled) behind the `ImageFamily` interface.

Built from `core.families.flux2.load` (loading, latents), `.text` (Qwen3 prompts), `.loss` and `.lora_files`
on the transformer families' default (core.families.dit.default). Qwen3 encodes every caption once into a
disk cache and is freed before the transformer trains; the LoRA goes on the double blocks' attention and
MLPs and the single blocks' fused linear1 / linear2; flow matching with logit-normal sampling (the
reference trainer's), no guidance input (klein has no guidance embedding).

Train on the base model ("klein-base"): the distilled one is a 4-step model whose LoRAs trained directly
lose its few-step behaviour (BFL and the reference trainers train base). Previews use the loaded model's
own regime: base 50-step-style with CFG (the configured steps and guidance), distilled without CFG.
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
from core.families.dit.default import (TransformerSpec, add_lora, draw_each, flow_scheduler, latent_call,
                                       place_for_tryout, preview_size, timestep_sampling, transformer_family)
from core.families.flux2.load import encode_moments, normalize_latents
from core.families.flux2.loss import make_loss
from core.families.flux2.text import encode_entries, prompt_identity, stack
from core.family_api.contract import Adapted, Log


def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
    from core.families.flux2.load import load_model

    return load_model(cfg.base_model, config_source=cfg.base_model_config, text_encoder=first_text_encoder_file(cfg),
                      vae=cfg.vae, dtype=dtype, quantization_config=quantization_config)


def lora_targets(transformer: nn.Module, cfg: TrainConfig) -> list[str]:
    from core.families.flux2.load import lora_targets as targets

    return targets(transformer)


def read_lora(path: Path) -> Any:
    from core.families.flux2.lora_files import read_lora as read

    return read(path)


def write_kohya(model: Any, state: dict[str, torch.Tensor], path: Path, **kwargs: Any) -> Path:
    """BFL kohya names (ComfyUI)."""
    from core.families.flux2.lora_files import write_kohya_file

    return write_kohya_file(state, path, variant=model.variant, **kwargs)


def write_diffusers(state: dict[str, torch.Tensor], folder: Path, **kwargs: Any) -> Path:
    from core.families.flux2.lora_files import write_diffusers_file

    return write_diffusers_file(state, folder, **kwargs)


def refuse_other_variant(model: Any, init_file: Path) -> None:
    """A LoRA of another FLUX.2 variant (klein 4B, 9B, dev: same module names, other widths) is refused in
    one sentence, before PEFT would fail on a shape or half-load it."""
    from core.export.inspect import inspect_lora, lora_family_mismatch

    message = lora_family_mismatch(inspect_lora(init_file), model.variant)
    if message:
        raise ValueError(message)


def add_lora_checked(model: Any, cfg: TrainConfig, init_file: Path | None, log: Log) -> Adapted:
    if init_file is not None:
        refuse_other_variant(model, init_file)
    return add_lora(SPEC, model, cfg, init_file, log)


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(scheduler=flow_scheduler(model), vae=model.vae, text_encoder=model.text_encoder,
                              tokenizer=model.tokenizer, transformer=model.transformer if transformer is None else transformer,
                              is_distilled=model.distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[str]], Any] | None = None, dtype: torch.dtype = torch.float32
             ) -> list[Image.Image]:
    """One image per prompt from the same seed; `embeds`: cached encodings instead of Qwen3.

    Flux2KleinPipeline's guidance is real CFG for the base model (guidance > 1 runs the negative prompt;
    the pipeline's own negative is ""), ignored for the distilled one. The VAE decodes in fp32.
    """
    from core.sample import decode_fp32

    device = pipe.vae.device
    cfg_on = guidance > 1 and not pipe.config.is_distilled

    def call_for(prompt: str) -> dict[str, Any]:
        kwargs = latent_call(steps=steps, guidance_scale=guidance, width=width, height=height, seed=seed)
        if embeds is None:
            kwargs["prompt"] = prompt
        else:
            kwargs["prompt_embeds"] = embeds([prompt]).to(device, dtype)
            if cfg_on:
                kwargs["negative_prompt_embeds"] = embeds([negative_prompt or ""]).to(device, dtype)
        return kwargs

    return draw_each(pipe, prompts, call_for, lambda latents: decode_fp32(pipe.vae, latents, lambda c, x: x),
                     dtype=dtype)


def preview_settings(cfg: TrainConfig, distilled: bool) -> tuple[int, float]:
    """(steps, guidance): the configured ones; a distilled klein at its 4 steps without CFG unless changed."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    steps, guidance = cfg.sample_num_inference_steps, cfg.sample_guidance_scale
    if distilled:
        if steps == defaults["sample_num_inference_steps"]:
            steps = 4
        if guidance == defaults["sample_guidance_scale"]:
            guidance = 1.0
    return steps, guidance


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    steps, guidance = preview_settings(cfg, model.distilled)
    return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=steps, guidance=guidance,
                    negative_prompt=cfg.sample_negative_prompt, width=width, height=height, embeds=cached, dtype=dtype)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.flux2.load import load_model

    model = place_for_tryout(load_model(base_model, config_source=model_config, vae=vae), device, dtype)
    return build_pipeline(model), model


def default_size(model: Any) -> int:
    from core.families.dit.default import default_size as size

    return size(model)


def _lora_files() -> Any:
    from core.families.flux2.lora_files import lora_file_format

    return lora_file_format()


def _detect(base_model: str) -> str | None:
    from core.families.flux2.load import detect

    return detect(base_model)



SPEC = TransformerSpec(
    label="FLUX.2", trains="FLUX.2 trains the attention and MLP layers of every block",
    encoders_note="FLUX.2 always caches Qwen3's outputs (the text encoder is freed before training).",
    load=load, lora_targets=lora_targets, make_loss=make_loss, read_lora=read_lora,
    write_kohya=write_kohya, write_diffusers=write_diffusers, encode_entries=encode_entries, stack=stack,
    prompt_identity=prompt_identity, lora_init=True,
    training_note=lambda model, cfg: f"{timestep_sampling(cfg, model.variant)} timestep sampling, "
                                     f"{'distilled' if model.distilled else 'base'} model",
    # FLUX.2's modulation Linears are global (not in the blocks) and small: fp8 for all frozen Linears.
    fp8_cast_modulation=True)

FLUX2 = transformer_family(SPEC, detect=_detect, lora_files=_lora_files(), previews=previews,
                           tryout_pipeline=tryout_pipeline, generate=generate, add_lora=add_lora_checked,
                           encode_moments=encode_moments, normalize_latents=normalize_latents,
                           denormalize_latents=lambda config, latents: latents)
FAMILY = FLUX2
