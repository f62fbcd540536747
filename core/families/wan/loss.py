"""The Wan training objective (musubi-tuner's wan_train_network.py, diffusion-pipe's wan): flow matching where the
transformer, given the timestep sigma * 1000, predicts the velocity noise - x0; sigmas drawn with Wan's shift.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.families.dit.default import timestep_sampling
from core.families.wan.load import SHIFT, expands_timesteps
from core.family_api.contract import Batch


def wan_shift(cfg: TrainConfig) -> float:
    """The configured discrete_flow_shift, or Wan's 3.0 where the config keeps the FLUX default."""
    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "discrete_flow_shift")
    return SHIFT if cfg.discrete_flow_shift == default else cfg.discrete_flow_shift


def wan_loss(transformer: Any, latents: torch.Tensor, prompt_embeds: torch.Tensor,
             generator: torch.Generator | None = None, *, timestep_sampling: str = "shift", shift: float = SHIFT,
             dtype: torch.dtype = torch.float32, sigmas: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, sigma_range: tuple[float, float] = (0.0, 1.0),
             condition: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
             expand_timesteps: bool = False) -> torch.Tensor:
    """Flow-matching MSE in fp32 on latents [B, C, F, h, w] (an image: F = 1): x_s = (1 - s) x0 + s noise.

    `sigma_range`: a Wan 2.2 A14B expert's share of the noise levels; the drawn sigmas are mapped into it
    linearly (musubi-tuner's min_timestep / max_timestep per expert). I2V: `condition` (the first frame's
    condition latents, core.families.wan.i2v) goes in beside the noisy latents with its mask, `image_embeds`
    (Wan 2.1 I2V's CLIP features) to the image cross-attention. `expand_timesteps` (Wan 2.2 TI2V-5B): a clip's
    first latent frame stays clean with timestep 0 on its tokens (core.families.wan.i2v.expanded)."""
    from core.families.dit.flow import flow_target, noise_and_sigmas, noisy_latents, sample_sigmas
    from core.families.wan.i2v import expanded, transformer_input

    x0 = latents.float()
    if x0.ndim == 4:
        x0 = x0.unsqueeze(2)  # an image batch: one frame
    low, high = sigma_range
    noise, sigmas = noise_and_sigmas(x0, generator, noise, sigmas, lambda: low + (high - low) * sample_sigmas(
        x0.shape[0], timestep_sampling, shift=shift, generator=generator, device=x0.device))
    noisy, timestep, first = noisy_latents(x0, noise, sigmas), sigmas * 1000, 0
    if expand_timesteps:
        noisy, timestep, first = expanded(noisy, x0, sigmas, tuple(transformer.config.patch_size))
    noisy = transformer_input(noisy, condition).to(dtype)
    image = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds.to(x0.device, dtype)}
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = transformer(hidden_states=noisy, timestep=timestep.to(x0.device, dtype),
                           encoder_hidden_states=prompt_embeds.to(x0.device, dtype), return_dict=False,
                           **image)[0]
    return F.mse_loss(pred.float()[:, :, first:], flow_target(x0, noise)[:, :, first:], reduction="mean")


def expert_sigma_range(model: Any, expert: str | None = None) -> tuple[float, float]:
    """The noise levels the trained network sees: all, or a Wan 2.2 A14B expert's side of boundary_ratio (the
    pipeline runs `transformer` for t >= boundary * 1000, `transformer_2` below); `expert` over the model's."""
    expert = expert or getattr(model, "expert", "")
    if not expert or expert == "both":
        return 0.0, 1.0
    return (model.boundary_ratio, 1.0) if expert == "high" else (0.0, model.boundary_ratio)


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """The loss of one batch; with both Wan 2.2 A14B experts in training, each step first draws one noise level
    from the run's sampling, and the expert whose side of boundary_ratio it falls on trains on the batch (the
    batch's own levels mapped into that side): each expert trains on the share of steps the sampling gives
    its noise levels, as musubi-tuner picks the DiT by the sampled timestep."""
    from core.families.dit.flow import sample_sigmas

    sampling = timestep_sampling(cfg, model.variant)
    shift = wan_shift(cfg)
    sigma_range = expert_sigma_range(model)

    channels = model.transformer.config.out_channels
    expand = expands_timesteps(model.variant)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        from core.families.wan.i2v import split
        from core.families.wan.text import WanCondition

        network, side = transformer, sigma_range
        if model.expert == "both":
            drawn = float(sample_sigmas(1, sampling, shift=shift, device=batch.latents.device)[0])
            expert = "high" if drawn >= model.boundary_ratio else "low"
            network = transformer if expert == "high" else model.other_expert
            side = expert_sigma_range(model, expert)
        latents, condition = split(batch.latents, channels)
        prompts, image = ((batch.cond.prompt_embeds, batch.cond.image_embeds) if isinstance(batch.cond, WanCondition)
                          else (batch.cond, None))
        return wan_loss(network, latents, prompts, timestep_sampling=sampling, shift=shift, dtype=dtype,
                        sigma_range=side, condition=condition, image_embeds=image, expand_timesteps=expand)

    return loss
