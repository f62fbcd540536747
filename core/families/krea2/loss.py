"""The Krea 2 training objective (diffusers' train_dreambooth_lora_krea2.py): flow matching on the normalized
Qwen-Image VAE latents packed into 2x2 patches; the transformer, given sigma and the [text, image] position ids
(text rows at the origin), predicts the velocity noise - x0.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.families.dit.default import timestep_sampling
from core.family_api.contract import Batch


def krea2_loss(transformer: Any, latents: torch.Tensor, prompt: tuple[torch.Tensor, torch.Tensor],
               generator: torch.Generator | None = None, *, timestep_sampling: str = "logit_normal",
               shift: float = 3.0, dtype: torch.dtype = torch.float32, sigmas: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching MSE in fp32 on latents [B, C, h, w] (normalized)."""
    from diffusers import Krea2Pipeline

    from core.families.dit.flow import (flow_target, noise_and_sigmas, noisy_latents, pack_latents, sample_sigmas,
                                        unpack_latents)

    x0 = latents.float()
    noise, sigmas = noise_and_sigmas(x0, generator, noise, sigmas, lambda: sample_sigmas(
        x0.shape[0], timestep_sampling, shift=shift, generator=generator, device=x0.device))
    packed = pack_latents(noisy_latents(x0, noise, sigmas)).to(dtype)
    embeds, mask = prompt
    embeds, mask = embeds.to(x0.device, dtype), mask.to(x0.device)
    h, w = x0.shape[-2:]
    ids = Krea2Pipeline.prepare_position_ids(embeds.shape[1], h // 2, w // 2, x0.device)
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = transformer(hidden_states=packed, encoder_hidden_states=embeds, timestep=sigmas.to(x0.device, dtype),
                           position_ids=ids, encoder_attention_mask=mask, return_dict=False)[0]
    return F.mse_loss(unpack_latents(pred.float(), h, w), flow_target(x0, noise), reduction="mean")


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    sampling = timestep_sampling(cfg, model.variant)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return krea2_loss(transformer, batch.latents, batch.cond, timestep_sampling=sampling,
                          shift=cfg.discrete_flow_shift, dtype=dtype)

    return loss
