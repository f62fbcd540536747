"""The SD3 / SD3.5 training objective: the reference default of diffusers' train_dreambooth_lora_sd3.py, which
sd-scripts' sd3_train_network.py shares: sigma = shift(sigmoid(N(0, 1))) with the scheduler's shift 3.0,
x_sigma = (1 - sigma) x0 + sigma noise, the output preconditioned to an x0 estimate
(`precondition_outputs=1`: x_sigma - sigma * v) against x0, MSE with weight 1.
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

SD3_SHIFT = 3.0   # FlowMatchEulerDiscreteScheduler shift of SD3 / SD3.5 (their scheduler_config.json)


def flow_shift(cfg: TrainConfig) -> float:
    """The configured shift; the config's own default (FLUX.1's 3.1582) means SD3's scheduler shift 3.0."""
    default = TrainConfig.__dataclass_fields__["discrete_flow_shift"].default
    return SD3_SHIFT if cfg.discrete_flow_shift == default else float(cfg.discrete_flow_shift)


def sd3_loss(transformer: nn.Module, latents: torch.Tensor, cond: Any, generator: torch.Generator | None = None, *,
             timestep_sampling: str = "shift", shift: float = SD3_SHIFT, dtype: torch.dtype = torch.float32,
             sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The preconditioned flow-matching MSE of one batch in fp32 (see the module docstring)."""
    from core.families.dit.flow import noise_and_sigmas, noisy_latents, sample_sigmas

    x0 = latents.float()
    noise, sigmas = noise_and_sigmas(x0, generator, noise, sigmas, lambda: sample_sigmas(
        x0.shape[0], timestep_sampling, shift=shift, generator=generator, device=x0.device))
    noisy = noisy_latents(x0, noise, sigmas)
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = transformer(hidden_states=noisy.to(dtype), timestep=(sigmas * 1000).to(x0.device, dtype),
                           encoder_hidden_states=cond.prompt_embeds.to(x0.device, dtype),
                           pooled_projections=cond.pooled.to(x0.device, dtype), return_dict=False)[0]
    s = sigmas.view(-1, 1, 1, 1)
    return F.mse_loss(noisy - s * pred.float(), x0, reduction="mean")


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    sampling = timestep_sampling(cfg, model.variant)
    shift = flow_shift(cfg)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return sd3_loss(transformer, batch.latents, batch.cond, timestep_sampling=sampling, shift=shift, dtype=dtype)

    return loss
