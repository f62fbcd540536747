"""Flow-matching maths shared by the transformer families: noise levels, noisy latents, the target, 2x2 patches.

Rectified flow: x_sigma = (1 - sigma) * x0 + sigma * noise, and the network learns the velocity
noise - x0 (or an estimate derived from it). Sigmas are drawn by sd-scripts' `timestep_sampling`
names; a family picks its default and its shift. Patch-based transformers see the latents as a
sequence of 2x2 patches, channel-major ("packed").
"""
from __future__ import annotations

from collections.abc import Callable

import torch

TIMESTEP_SAMPLING = ("shift", "sigmoid", "logit_normal", "uniform")


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift s*t / (1 + (s-1)*t): s > 1 moves training toward the noisier end."""
    return shift * t / (1 + (shift - 1) * t)


def sample_sigmas(batch_size: int, method: str = "shift", *, shift: float, sigmoid_scale: float = 1.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Sigmas in (0, 1) for one batch (fp32), by sd-scripts' `timestep_sampling` names.

    shift: sigmoid(scale * randn) then the time shift; sigmoid: sigmoid(scale * randn);
    logit_normal: sigmoid(N(mean, std)); uniform: U(0, 1).
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    gen_device = generator.device if generator is not None else device
    if method in ("shift", "sigmoid"):
        t = torch.sigmoid(sigmoid_scale * torch.randn(batch_size, generator=generator, device=gen_device))
        sigmas = shift_sigmas(t, shift) if method == "shift" else t
    elif method in ("logit_normal", "uniform"):
        sigmas = compute_density_for_timestep_sampling(
            "logit_normal" if method == "logit_normal" else "none", batch_size, logit_mean=logit_mean,
            logit_std=logit_std, device=gen_device, generator=generator)
    else:
        raise ValueError(f"Unknown timestep_sampling '{method}'; choose one of {', '.join(TIMESTEP_SAMPLING)}.")
    return sigmas.float().to(device)


def noise_and_sigmas(x0: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None,
                     sigmas: torch.Tensor | None, draw_sigmas: Callable[[], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 noise on x0's device, sigmas): the given ones (validation on fixed noise), else drawn from
    `generator`, the noise first, so a seeded generator makes the step reproducible."""
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device)
    if sigmas is None:
        sigmas = draw_sigmas()
    return noise.float().to(x0.device), sigmas


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) * x0 + sigma * noise, sigma per sample broadcast over the other dims."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer learns: noise - x0."""
    return noise - x0


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches, channel-major (the pipelines' `_pack_latents`)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"These latents need an even height and width (2x2 patches); got {h}x{w} "
                         "(use image sizes that are multiples of 16 pixels).")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] for latent height/width H, W (inverse of `pack_latents`)."""
    b, n, d = packed.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} patches do not make a {height}x{width} latent.")
    patches = packed.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)
