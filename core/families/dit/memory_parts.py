"""The memory-estimate parts the transformer families count the same way (their `memory_parts` hooks)."""
from __future__ import annotations

from typing import Any

from core.config import TrainConfig


# Bytes per frozen weight stored in fp8, or in NF4 (4 bits plus one fp32 scale per 64 weights).
WEIGHT_BYTES = {"fp8": 1.0, "nf4": 0.5 + 4 / 64}


def weight_bytes(cfg: TrainConfig, compute_bytes: int) -> float:
    """Bytes per frozen transformer weight: NF4 wins over fp8, fp8 over the compute dtype."""
    if cfg.base_quantization == "nf4":
        return WEIGHT_BYTES["nf4"]
    return WEIGHT_BYTES["fp8"] if cfg.fp8_base else float(compute_bytes)


def swapped_weights(cfg: TrainConfig, blocks: int, block_weights: float, params: int,
                    in_flight: float | None = None) -> float:
    """Transformer weights `blocks_to_swap` keeps off the GPU: that share of the `blocks` blocks' weights
    (`block_weights`, all of them, at most the model's `params`), less the two blocks in flight (the one
    running and the one being copied in; `in_flight`: the largest block, where they differ)."""
    swapped = min(max(cfg.blocks_to_swap, 0), blocks)
    if not swapped:
        return 0.0
    share = min(params, block_weights) * swapped / blocks
    return max(0.0, share - 2 * (block_weights / blocks if in_flight is None else in_flight))


def block_activations(cfg: TrainConfig, *, passes: int, width: int, tokens: int, block: float, scale: float) -> float:
    """Activations of `passes` block passes over `tokens` tokens, times `scale` (the compute dtype's share): each
    pass keeps `block` bytes (one block's saved tensors for all the tokens) without gradient checkpointing; with
    it, each keeps its input (2 x `width` bytes a token) and one block is recomputed."""
    if cfg.gradient_checkpointing:
        return (passes * 2 * width * tokens + block) * scale
    return passes * block * scale


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
