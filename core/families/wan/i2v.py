"""Wan image-to-video (Wan 2.1 I2V 14B, Wan 2.2 I2V A14B): each clip is conditioned on its own first frame, as
`WanImageToVideoPipeline` conditions on its start image (diffusers 0.42, `prepare_latents`, expand_timesteps off):

- the condition video is the start image followed by F - 1 black (zero) frames, encoded by the Wan VAE (its
  mode, "argmax") and normalised like the latents: `latent_condition` [B, 16, F', h, w];
- a mask [B, 4, F', h, w]: the first latent frame's 4 sub-frames 1, the rest 0;
- the transformer takes cat([noisy latents, mask, latent_condition]) on the channels (16 + 4 + 16 = 36) and
  predicts the velocity of the 16 latent channels; Wan 2.1's also takes the start image's CLIP ViT-H features
  (`encoder_hidden_states_image`: the penultimate hidden state, `encode_image`).

Training: the condition latents are computed once with the clip's latents (`condition_moments`: the run's
latent cache holds [mean, condition, logvar, -30] so that drawing a latent from the moments leaves the condition
as it is, to within e^-15); an image is a one-frame clip (its condition is itself). The VAE of an I2V model is
marked (`CONDITION_KEY` in its config), which also keys the latent cache apart from a text-to-video run's. The
CLIP features go with the prompt (core.families.wan.text): the run keys its prompt cache by (caption, item).
"""
from __future__ import annotations

from typing import Any

import torch

CONDITION_KEY = "wan_i2v_condition"  # set in the VAE config of an image-to-video model
TEMPORAL = 4  # the VAE's temporal compression: the mask has 4 sub-frames per latent frame


def mark_vae(vae: Any) -> None:
    """The VAE of an I2V model: its latents carry the first-frame condition (and its cache is its own)."""
    vae.register_to_config(**{CONDITION_KEY: True})


def conditions(vae_config: Any) -> bool:
    return bool(getattr(vae_config, CONDITION_KEY, False) or dict(vae_config).get(CONDITION_KEY, False))


@torch.no_grad()
def condition_moments(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE moments of pixels [B, 3, F, H, W] in [-1, 1]; for an I2V model with the pipeline's condition latents
    packed in: [mean, condition, logvar, -30] on the channels."""
    from core.families.dit.video_vae import one_frame_convs

    one_frame_convs(vae)  # an image, and each clip's first frame, through 2D convolutions
    param = next(vae.parameters())
    pixels = pixels.to(param.device, param.dtype)
    moments = vae.encode(pixels).latent_dist.parameters
    if not conditions(vae.config):
        return moments
    start = torch.cat([pixels[:, :, :1], torch.zeros_like(pixels[:, :, 1:])], dim=2)
    condition = vae.encode(start).latent_dist.mode()
    mean, logvar = moments.chunk(2, dim=1)
    return torch.cat([mean, condition, logvar, torch.full_like(condition, -30.0)], dim=1)


def split(latents: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents, condition latents or None) of what the run hands the loss."""
    if latents.shape[1] == 2 * channels:
        return latents[:, :channels], latents[:, channels:]
    return latents, None


def first_frame_mask(condition: torch.Tensor) -> torch.Tensor:
    """The pipeline's mask [B, 4, F', h, w] for a start image: 1 on the first latent frame, 0 after."""
    mask = torch.zeros(condition.shape[0], TEMPORAL, *condition.shape[2:], device=condition.device,
                       dtype=condition.dtype)
    mask[:, :, 0] = 1
    return mask


def transformer_input(noisy: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """What the transformer takes: the noisy latents, then (I2V) the mask and the condition latents."""
    if condition is None:
        return noisy
    condition = condition.to(noisy.dtype)
    return torch.cat([noisy, first_frame_mask(condition), condition], dim=1)


@torch.no_grad()
def clip_features(model: Any, images: list[Any]) -> torch.Tensor:
    """Wan 2.1 I2V: the CLIP ViT-H features of start images, as the pipeline's `encode_image` computes them."""
    encoder = model.image_encoder
    param = next(encoder.parameters())
    inputs = model.image_processor(images=images, return_tensors="pt").to(param.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return encoder(**inputs, output_hidden_states=True).hidden_states[-2].float()


def normalize_condition_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, of the latents and (I2V) of the condition latents packed after them, as the
    pipeline normalises both."""
    from core.families.dit.video_vae import normalize_latents

    if latents.shape[1] == 2 * len(vae_config.latents_mean):
        return torch.cat([normalize_latents(vae_config, half) for half in latents.chunk(2, dim=1)], dim=1)
    return normalize_latents(vae_config, latents)


def expanded(noisy: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor, patch: tuple[int, int, int]
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Wan 2.2 TI2V-5B (the pipelines' `expand_timesteps`): (the transformer's input, a timestep per token
    [B, tokens], the first latent frame the loss counts). A clip's first latent frame stays clean, its start
    image (timestep 0 on its tokens, left out of the loss: the pipeline puts the condition back over it); an
    image (one latent frame) is noised whole (text to video: every token at the drawn timestep)."""
    first = 1 if x0.shape[2] > 1 else 0
    mask = torch.ones_like(x0[:, :1])
    mask[:, :, :first] = 0
    hidden = mask * noisy + (1 - mask) * x0
    tokens = mask[:, 0, :, ::patch[1], ::patch[2]].flatten(1)
    return hidden, tokens * (sigmas.reshape(-1, 1) * 1000).to(tokens), first
