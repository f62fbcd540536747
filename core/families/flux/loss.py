"""FLUX / Chroma training math: latents, 2x2 packing, sigma sampling, the flow-matching loss.

Rectified flow: x_sigma = (1 - sigma) * x0 + sigma * noise, and the transformer predicts
the velocity noise - x0. The transformer takes sigma in [0, 1] as `timestep` (it scales
by 1000 itself) and sees the latents as a sequence of 2x2 patches ("packed"), each with
an (0, row, col) position id. FLUX.1-dev also takes a guidance value (1.0 when training,
as sd-scripts and ai-toolkit do); schnell and Chroma have no guidance input, and Chroma
takes an attention mask over the T5 tokens instead of CLIP's pooled vector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from core.families.dit.flow import flow_target, noise_and_sigmas, noisy_latents, pack_latents, sample_sigmas
from core.families.flux.text import PromptEmbeds

DEFAULT_SHIFT = 3.1582  # sd-scripts' / FluxGym's discrete_flow_shift for FLUX.1
# Per-variant training defaults (field notes: dev guidance 1.0 + shift; Chroma sigmoid, no guidance).
VARIANT_DEFAULTS = {
    "flux-dev": {"timestep_sampling": "shift", "guidance": 1.0},
    "flux-kontext": {"timestep_sampling": "shift", "guidance": 1.0},
    "flux-schnell": {"timestep_sampling": "shift", "guidance": None},
    "chroma": {"timestep_sampling": "sigmoid", "guidance": None},
}


# --- latents -----------------------------------------------------------------------------------------


def vae_scale(vae: Any) -> tuple[float, float]:
    """(shift_factor, scaling_factor) of a FLUX AE (0.1159 and 0.3611 for the real one)."""
    return float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training latents [B, C, h, w] of pixels in [-1, 1]: (sample - shift_factor) * scaling_factor."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    shift, scale = vae_scale(vae)
    return ((dist.sample(generator) - shift) * scale).float()


def latents_from_moments(moments: torch.Tensor, vae_config: Any, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """Training latents from cached VAE moments [B, 2C, h, w] (the project's latent cache format)."""
    from core.train.latent_cache import sample_latents

    return sample_latents(moments, float(vae_config.scaling_factor), float(vae_config.shift_factor or 0.0),
                          generator)


def latents_for_decode(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """The inverse of the training scaling, for `vae.decode`."""
    shift, scale = vae_scale(vae)
    return latents / scale + shift


def latent_image_ids(height: int, width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids (0, row, col) of the packed patches of an H x W latent."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


# --- the loss -----------------------------------------------------------------------------------------


@dataclass
class FluxBatch:
    """What one step needs: scaled latents [B, C, H, W] and the prompts' encodings."""

    latents: torch.Tensor
    prompts: PromptEmbeds
    control: torch.Tensor | None = None  # FLUX.1 Kontext: the control image's latents [B, C, h, w]


def _config(transformer: Any) -> Any:
    # Under DistributedDataParallel (several processes) the model and its config are `.module`.
    return getattr(transformer, "module", transformer).config


def is_chroma(transformer: Any) -> bool:
    """Chroma's config has the approximator (its replacement for FLUX's modulation MLPs)."""
    return "approximator_num_channels" in dict(_config(transformer))


def transformer_inputs(transformer: Any, packed: torch.Tensor, sigmas: torch.Tensor, prompts: PromptEmbeds,
                       height: int, width: int, *, guidance: float | None = 1.0,
                       dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The keyword arguments of one FluxTransformer2DModel / ChromaTransformer2DModel call."""
    device = packed.device
    batch = packed.shape[0]
    kwargs: dict[str, Any] = dict(
        hidden_states=packed.to(dtype), timestep=sigmas.to(device, dtype),
        encoder_hidden_states=prompts.prompt_embeds.to(device, dtype),
        # Position ids stay fp32: bf16 holds integers exactly only up to 256 patches per side.
        txt_ids=prompts.text_ids.to(device, torch.float32), img_ids=latent_image_ids(height, width, device),
        return_dict=False)
    if is_chroma(transformer):
        if prompts.attention_mask is not None:
            # Text mask, then every image token visible (ChromaPipeline._prepare_attention_mask).
            image = torch.ones(batch, packed.shape[1], device=device, dtype=torch.bool)
            kwargs["attention_mask"] = torch.cat([prompts.attention_mask.to(device).bool(), image], dim=1)
        return kwargs
    if prompts.pooled is None:
        raise ValueError("FLUX.1 needs CLIP-L's pooled prompt embedding; it is missing from the batch.")
    kwargs["pooled_projections"] = prompts.pooled.to(device, dtype)
    has_guidance = bool(getattr(_config(transformer), "guidance_embeds", False))
    # dev was distilled with a guidance input and must get one; schnell has no guidance embedding.
    kwargs["guidance"] = (torch.full((batch,), 1.0 if guidance is None else guidance, device=device,
                                     dtype=torch.float32) if has_guidance else None)
    return kwargs


def flux_loss(transformer: Any, batch: FluxBatch, generator: torch.Generator | None = None, *,
              timestep_sampling: str = "shift", shift: float = DEFAULT_SHIFT, sigmoid_scale: float = 1.0,
              guidance: float | None = 1.0, dtype: torch.dtype = torch.float32,
              sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching MSE of one batch in fp32, the transformer run in `dtype` (autocast unless fp32).

    `sigmas` / `noise` may be given (validation loss on fixed noise); otherwise they are
    drawn from `generator`, so a seeded generator makes the step reproducible.
    """
    x0 = batch.latents.float()
    b, _, h, w = x0.shape
    noise, sigmas = noise_and_sigmas(x0, generator, noise, sigmas, lambda: sample_sigmas(
        b, timestep_sampling, shift=shift, sigmoid_scale=sigmoid_scale, generator=generator, device=x0.device))
    packed = pack_latents(noisy_latents(x0, noise, sigmas))
    tokens = packed.shape[1]
    if batch.control is not None:
        # Kontext: the control's packed tokens after the target's, their position ids' first coordinate 1
        # (FluxKontextPipeline.prepare_latents); the prediction of the target's tokens is kept.
        control = batch.control.float().to(x0.device)
        packed = torch.cat([packed, pack_latents(control)], dim=1)
    kwargs = transformer_inputs(transformer, packed, sigmas, batch.prompts, h, w, guidance=guidance, dtype=dtype)
    if batch.control is not None:
        ids = latent_image_ids(control.shape[2], control.shape[3], x0.device)
        ids[:, 0] = 1
        kwargs["img_ids"] = torch.cat([kwargs["img_ids"], ids], dim=0)
    # Under autocast an fp32 LoRA meets bf16 base layers: diffusers' fp8 storage switches off
    # PEFT's own input casting, so without it a bf16 activation would hit the fp32 lora_A.
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = transformer(**kwargs)[0]
    return F.mse_loss(pred[:, :tokens].float(), pack_latents(flow_target(x0, noise)), reduction="mean")


def image_seq_len(height_px: int, width_px: int, vae_scale_factor: int = 8) -> int:
    """Packed tokens of an image: (H/16)(W/16) for FLUX's 8x AE (4096 at 1024 px)."""
    return math.ceil(height_px / (vae_scale_factor * 2)) * math.ceil(width_px / (vae_scale_factor * 2))
