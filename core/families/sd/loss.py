"""One UNet training step: noise, the UNet pass and the loss.

Pure functions with explicit parameters (the diffusers example's loop, split up):
epsilon or v-prediction target, noise offset, min-SNR weighting. The prompts and SDXL's
added conditioning come from the family (`core.families.sd.family`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as in diffusers' example."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def diffusion_loss(unet: Any, noise_scheduler: Any, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, *,
                   prediction_type: str, noise_offset: float = 0.0, snr_gamma: float = 0.0,
                   added_cond: dict[str, torch.Tensor] | None = None, weight_dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """The denoising loss of one batch (fp32), with the UNet run in `weight_dtype`."""
    noise = torch.randn_like(latents)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    batch = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy.to(weight_dtype), timesteps, encoder_hidden_states.to(weight_dtype),
                added_cond_kwargs=added_cond, return_dict=False)[0]
    if snr_gamma > 0:
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (loss * snr_weights(noise_scheduler, timesteps, snr_gamma, prediction_type)).mean()
    return F.mse_loss(pred.float(), target.float(), reduction="mean")
