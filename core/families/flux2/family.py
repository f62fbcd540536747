"""FLUX.2 (klein 4B / 9B, base and distilled; dev) behind the `ImageFamily` interface.

Built from `core.families.flux2.load` (loading, latents), `.text` (Qwen3 / Mistral-Small prompts), `.loss` and
`.lora_files` on the transformer families' default (core.families.dit.default). The text encoder encodes every
caption once into a disk cache and is freed before the transformer trains; the LoRA goes on the double blocks'
attention and MLPs and the single blocks' fused linear1 / linear2; flow matching with logit-normal sampling (the
reference trainers'). klein has no guidance input; dev (guidance-distilled) gets `train_guidance` in its guidance
embedding, 3.5 unless set (diffusers' train_dreambooth_lora_flux2.py), and previews with embedded guidance (no
CFG: Flux2Pipeline), 28 steps at 4.0 unless set.

Train on the base model ("klein-base"): the distilled one is a 4-step model whose LoRAs trained directly
lose its few-step behaviour (BFL and the reference trainers train base). Previews use the loaded model's
own regime: base 50-step-style with CFG (the configured steps and guidance), distilled without CFG.

Edit (the same checkpoint): a target with reference images (control/, control_2/ ...) trains with their latents
as extra tokens after its own, as `Flux2KleinPipeline(image=[...])` draws; the previews and the Test tab pass the
references as `image`; plain images train as text-to-image in the same run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.config import TrainConfig
from core.families.dit.default import (Draw, TransformerSpec, add_lora, flow_scheduler, lazy, package_family, package_parts,
                                       pipeline_generate, timestep_sampling, unless_set)
from core.families.flux2.load import decode_latents, encode_moments, latent_ids, normalize_latents, unpack
from core.family_api.contract import Adapted, Log


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
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    if model.variant == "flux2-dev":
        pipe = Flux2Pipeline(scheduler=flow_scheduler(model), vae=model.vae, text_encoder=model.text_encoder,
                             tokenizer=model.tokenizer,
                             transformer=model.transformer if transformer is None else transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = Flux2KleinPipeline(scheduler=flow_scheduler(model), vae=model.vae, text_encoder=model.text_encoder,
                              tokenizer=model.tokenizer, transformer=model.transformer if transformer is None else transformer,
                              is_distilled=model.distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_for(pipe: Any, draw: Draw, prompt: str, control: Any = None) -> dict[str, Any]:
    """Flux2KleinPipeline's guidance is real CFG for the base model (guidance > 1 runs the negative prompt;
    the pipeline's own negative is ""), ignored for the distilled one; Flux2Pipeline's (dev) goes into the
    guidance embedding (no negative prompt). `control`: the reference images of an edit (PIL images), each
    one's tokens beside the target's."""
    kwargs = draw.latents(guidance_scale=draw.guidance)
    if control:
        kwargs["image"] = list(control) if isinstance(control, (list, tuple)) else [control]
    cfg_on = draw.guidance > 1 and not getattr(pipe.config, "is_distilled", True)
    if draw.embeds is None:
        kwargs["prompt"] = prompt
    else:
        kwargs["prompt_embeds"] = draw.encoded(prompt)
        if cfg_on:
            kwargs["negative_prompt_embeds"] = draw.encoded(draw.negative_prompt or "")
    return kwargs


def _decode(pipe: Any, latents: torch.Tensor, draw: Draw) -> list[Any]:
    """The latents as images, the VAE in fp32: Flux2KleinPipeline gives them decoded-ready (left as they are),
    Flux2Pipeline (dev) as its packed tokens, which are unpacked onto the image's grid and denormalized first."""
    from core.sample import decode_fp32

    if latents.ndim == 3:
        step = pipe.vae_scale_factor * 2
        grid = torch.empty(1, 1, draw.height // step, draw.width // step)
        return decode_latents(pipe.vae, unpack(latents.float(), latent_ids(grid).to(latents.device)))
    return decode_fp32(pipe.vae, latents, lambda config, x: x)


generate = pipeline_generate(_call_for, _decode)


# dev's guidance embedding while training unless set: diffusers' train_dreambooth_lora_flux2.py's --guidance_scale.
DEV_TRAIN_GUIDANCE = 3.5


def preview_settings(cfg: TrainConfig, distilled: bool, variant: str = "flux2-klein-4b") -> tuple[int, float]:
    """(steps, guidance): the configured ones; a distilled klein at its 4 steps without CFG unless changed,
    dev at its registry row's (28 steps, embedded guidance 4: diffusers' suggestion; BFL's reference is 50)."""
    if variant == "flux2-dev":
        from core.family_api.registry import family_info

        info = family_info(variant)
        return (unless_set(cfg, "sample_num_inference_steps", info.preview_steps),
                unless_set(cfg, "sample_guidance_scale", info.preview_guidance))
    if not distilled:
        return cfg.sample_num_inference_steps, cfg.sample_guidance_scale
    return unless_set(cfg, "sample_num_inference_steps", 4), unless_set(cfg, "sample_guidance_scale", 1.0)


def _settings(model: Any, cfg: TrainConfig) -> dict[str, Any]:
    steps, guidance = preview_settings(cfg, model.distilled, model.variant)
    return {"steps": steps, "guidance": guidance}


def train_guidance(model: Any, cfg: TrainConfig) -> float | None:
    """dev's guidance embedding input while training; None for klein (no guidance embedding)."""
    if not model.transformer.config.guidance_embeds:
        return None
    return unless_set(cfg, "train_guidance", DEV_TRAIN_GUIDANCE)


def training_regime(model: Any, cfg: TrainConfig) -> str:
    guidance = train_guidance(model, cfg)
    if guidance is not None:
        return f"guidance {guidance:g}"
    return f"{'distilled' if model.distilled else 'base'} model"


SPEC = TransformerSpec(
    label="FLUX.2", trains="FLUX.2 trains the attention and MLP layers of every block",
    encoders_note="FLUX.2 always caches its text encoder's outputs (Qwen3 or Mistral-Small, freed before training).",
    # BFL kohya names (ComfyUI).
    **{**package_parts("core.families.flux2"), "load": lazy("core.families.flux2.load", "load_for_training")},
    lora_init=True,
    training_note=lambda model, cfg: f"{timestep_sampling(cfg, model.variant)} timestep sampling, "
                                     f"{training_regime(model, cfg)}",
    # FLUX.2's modulation Linears are global (not in the blocks) and small: fp8 for all frozen Linears.
    fp8_cast_modulation=True,
    # klein edits take the references as latent tokens, not in the prompt: a caption's encoding is the caption's.
    prompt_key=lambda key: key[0] if isinstance(key, tuple) else key)

FLUX2 = package_family(SPEC, "core.families.flux2", build_pipeline=build_pipeline, generate=generate,
                       settings=_settings, add_lora=add_lora_checked, encode_moments=encode_moments,
                       normalize_latents=normalize_latents, denormalize_latents=lambda config, latents: latents)
FAMILY = FLUX2
