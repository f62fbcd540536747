"""The memory-estimate parts the transformer families count the same way (their `memory_parts` hooks)."""
from __future__ import annotations

from typing import Any

from core.config import TrainConfig


def caching_latents(cfg: TrainConfig) -> bool:
    """Whether the run caches latents (then the VAE is not in memory while training)."""
    return bool(cfg.cache_latents and cfg.center_crop and not cfg.random_flip)


def transient_and_latents(parts: dict[str, float], cfg: TrainConfig, device: Any, *, transient: float,
                          cached_images: int, vae_width: int = 128) -> dict[str, float]:
    """Adds the backward transient (at least the VAE's encode when latents are not cached; `vae_width`: its
    widest feature map's channels) and, off CUDA, the cached latents (16 channels' mean and logvar in fp32,
    in RAM, where RAM is the memory)."""
    if not caching_latents(cfg):
        transient = max(transient, 4 * vae_width * cfg.resolution ** 2 * cfg.batch_size * 4 - parts["activations"])
    parts["backward transient"] = transient
    if caching_latents(cfg) and device.kind != "cuda":
        parts["cached latents"] = cached_images * 32 * (cfg.resolution // 8) ** 2 * 4
    return parts
