"""The Z-Image training objective (diffusers' train_dreambooth_lora_z_image.py): flow matching where the
transformer, given 1 - sigma, predicts x0 - noise.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.families.dit.default import timestep_sampling
from core.family_api.contract import Batch


@dataclass
class ZImageBatch:
    """Scaled latents [B, C, h, w] and one [L_i, D] caption encoding per image."""

    latents: torch.Tensor
    prompts: list[torch.Tensor]


def zimage_loss(transformer: Any, batch: ZImageBatch, generator: torch.Generator | None = None, *,
                timestep_sampling: str = "shift", shift: float = 3.0, dtype: torch.dtype = torch.float32,
                sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching MSE in fp32: x_s = (1 - s) x0 + s noise; the transformer, given 1 - s, predicts x0 - noise.

    Same objective as diffusers' train_dreambooth_lora_z_image.py (which negates the prediction
    and compares it with noise - x0); sigmas drawn by `core.families.dit.flow.sample_sigmas`.
    """
    from core.families.dit.flow import noise_and_sigmas, noisy_latents, sample_sigmas

    x0 = batch.latents.float()
    noise, sigmas = noise_and_sigmas(x0, generator, noise, sigmas, lambda: sample_sigmas(
        x0.shape[0], timestep_sampling, shift=shift, generator=generator, device=x0.device))
    noisy = noisy_latents(x0, noise, sigmas).to(dtype)
    x = [sample.unsqueeze(1) for sample in noisy]  # [C, 1, h, w]: the frame axis
    caps = [p.to(x0.device, dtype) for p in batch.prompts]
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = transformer(x, (1 - sigmas).to(x0.device, dtype), caps, return_dict=False)[0]
    pred = torch.stack([o.float() for o in out]).squeeze(2)
    return F.mse_loss(pred, x0 - noise, reduction="mean")


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    sampling = timestep_sampling(cfg, model.variant)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return zimage_loss(transformer, ZImageBatch(batch.latents, list(batch.cond)), timestep_sampling=sampling,
                           shift=cfg.discrete_flow_shift, dtype=dtype)

    return loss
