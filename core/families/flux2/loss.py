"""The FLUX.2 training objective (diffusers' train_dreambooth_lora_flux2_klein.py and _flux2.py): flow matching
on the patchified, batch-norm normalized latents packed into tokens; the transformer, given sigma (the time
t / 1000), no guidance for klein and the training guidance for dev, predicts the velocity noise - x0. An edit's
reference latents follow the target's tokens with the pipeline's position ids; only the target's tokens are in
the loss.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.families.dit.default import timestep_sampling
from core.families.flux2.load import latent_ids, pack, text_ids, unpack
from core.family_api.contract import Batch


def reference_tokens(references: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """An edit's reference latents [B, 4C, h, w] each -> (their tokens side by side, their position ids), as
    Flux2KleinPipeline.prepare_image_latents: reference i at time coordinate 10 + 10 i, its own h, w grid."""
    from diffusers import Flux2KleinPipeline

    batch = references[0].shape[0]
    ids = Flux2KleinPipeline._prepare_image_ids([r[:1] for r in references])  # noqa: SLF001 - the pipeline's layout
    return torch.cat([pack(r) for r in references], dim=1), ids.repeat(batch, 1, 1)


def flux2_loss(transformer: Any, latents: torch.Tensor, prompt_embeds: torch.Tensor,
               generator: torch.Generator | None = None, *, timestep_sampling: str = "logit_normal",
               shift: float = 3.0, guidance: float | None = None, dtype: torch.dtype = torch.float32,
               sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               references: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Flow-matching MSE in fp32 on latents [B, 4C, h, w] (already patchified and normalized). An edit's
    `references` go in as extra tokens after the target's; the loss is on the target's tokens alone."""
    from core.families.dit.flow import flow_target, noise_and_sigmas, noisy_latents, sample_sigmas

    x0 = latents.float()
    noise, sigmas = noise_and_sigmas(x0, generator, noise, sigmas, lambda: sample_sigmas(
        x0.shape[0], timestep_sampling, shift=shift, generator=generator, device=x0.device))
    noisy = noisy_latents(x0, noise, sigmas)
    ids = latent_ids(x0).to(x0.device)
    text = prompt_embeds.to(x0.device, dtype)
    txt_ids = text_ids(text).to(x0.device)
    packed = pack(noisy).to(dtype)
    tokens, img_ids = packed.shape[1], ids
    if references:
        ref_tokens, ref_ids = reference_tokens([r.float().to(x0.device) for r in references])
        packed = torch.cat([packed, ref_tokens.to(dtype)], dim=1)
        img_ids = torch.cat([ids, ref_ids.to(x0.device)], dim=1)
    guidance_in = None
    if guidance is not None:
        guidance_in = torch.full((x0.shape[0],), guidance, device=x0.device, dtype=dtype)
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = transformer(hidden_states=packed, timestep=sigmas.to(x0.device, dtype), guidance=guidance_in,
                           encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    pred = unpack(pred[:, :tokens].float(), ids)
    return F.mse_loss(pred, flow_target(x0, noise), reduction="mean")


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    sampling = timestep_sampling(cfg, model.variant)
    from core.families.flux2.family import train_guidance

    guidance = train_guidance(model, cfg)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return flux2_loss(transformer, batch.latents, batch.cond, timestep_sampling=sampling,
                          shift=cfg.discrete_flow_shift, guidance=guidance, dtype=dtype, references=batch.references)

    return loss
