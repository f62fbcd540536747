"""Z-Image (Turbo and base) behind the `ImageFamily` interface.

Built from `core.families.zimage.load` (loading), `.text` (Qwen3 prompts), `.loss` and
`.lora_files` (files) on the transformer families' default (core.families.dit.default).
Qwen3-4B encodes every caption once into a disk
cache and is freed before the transformer trains; the LoRA goes on the attention + MLP Linears
of all 34 blocks (30 layers, 2 noise- and 2 context-refiners); flow matching with the
configured sampling (default: shift); fp8 storage, gradient checkpointing and block offload
are the transformer families' shared ones (core.families.dit).

Turbo is step-distilled (8 steps, no CFG). ai-toolkit trains it with a de-distilling "training
adapter" LoRA merged in while training and left out at inference (`training_adapter`, merged by
core.train.training_adapter for any transformer family); or the base trains and Turbo previews
(`sample_base`). Without either the run warns; previews use the model's own regime: Turbo 8 steps
without CFG, base with CFG.
"""
from __future__ import annotations

from typing import Any

from core.config import TrainConfig
from core.families.dit.default import (Draw, TransformerSpec, flow_scheduler, package_family, package_parts,
                                       pipeline_generate, unless_set)


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
    return unless_set(cfg, "sample_guidance_scale", 0.0) if variant == "z-image-turbo" else cfg.sample_guidance_scale


SPEC = TransformerSpec(
    label="Z-Image", trains="Z-Image trains the attention and MLP layers of every block",
    encoders_note="Z-Image always caches Qwen3's outputs (the 4B text encoder is freed before training).",
    **package_parts("core.families.zimage"), lora_init=True,
    # diffusers' default skips (norms, and Z-Image's own t_embedder / cap_embedder) already cast the
    # adaLN modulation Linears: its names hold no "norm".
    fp8_cast_modulation=False)

ZIMAGE = package_family(SPEC, "core.families.zimage", build_pipeline=build_pipeline, generate=generate,
                        settings=lambda model, cfg: {"guidance": preview_guidance(cfg, model.variant)})
FAMILY = ZIMAGE
