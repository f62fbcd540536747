"""Predicted peak memory of a Z-Image LoRA run, by part (the registry row's `memory_parts`).

Parts as for FLUX (core/families/flux/memory.py): the frozen transformer in its storage dtype (bf16,
fp8 with `fp8_base`, NF4 with `base_quantization: nf4`) less what `blocks_to_swap` keeps in CPU
memory, Qwen3-4B unless its outputs are cached (always here: the family frees it), the AE
unless latents are cached, the LoRA with its gradient and optimizer state, the activations and
the backward transient.

Activation numbers: bench/zimage_memory.py (the real width 3840 / 30 heads in bf16, LoRA-like
trainable attention + MLP weights, flash-style attention, every tensor autograd saves counted
once, on real CPU tensors because Z-Image's forward cannot run on the meta device): one main
block keeps 266,643 bytes per token without checkpointing (about 69.4 x width) and its input
(2 x width bytes) with it. All 34 blocks (30 main, 2 noise refiners over the image tokens,
2 context refiners over the text tokens) see each token once per block they run on, so the
activations are 32 block-passes of (image + text) tokens; with checkpointing 32 block inputs
plus one block recomputed. Text tokens: 512 at most (the pipeline's max_sequence_length),
counted in full so the estimate errs high.
"""
from __future__ import annotations

from core.config import TrainConfig
from core.families.dit.memory_parts import (block_activations, caching_latents, swapped_weights, transient_and_latents,
                                            weight_bytes)
from core.devices import DeviceInfo
from core.family_api.registry import FLUX_AE
from core.model_info import ModelInfo

REAL_WIDTH = 3840
HIDDEN = 10240                      # the MLP's width: int(3840 / 3 * 8)
MAIN_LAYERS, REFINERS = 30, 2       # + 2 noise refiners and 2 context refiners
BLOCKS = MAIN_LAYERS + 2 * REFINERS
TEXT_TOKENS = 512
BLOCK_BYTES_PER_TOKEN = 266_643 / REAL_WIDTH  # per unit of width, bf16, no checkpointing


def lora_params(rank: int, width: int = REAL_WIDTH) -> int:
    """q, k, v, out (h -> h) and w1, w3 (h -> 8h/3), w2 (8h/3 -> h) of all 34 blocks: rank x (in + out)."""
    hidden = int(width / 3 * 8)
    return rank * BLOCKS * (8 * width + 3 * width + 3 * hidden)


def block_params(width: int = REAL_WIDTH) -> int:
    """Weights of one block (attention, MLP, adaLN), biases left out."""
    return 4 * width * width + 3 * width * int(width / 3 * 8) + min(width, 256) * 4 * width


def zimage_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int,
                 lora_state_bytes: int, cached_images: int) -> dict[str, float]:
    """Every part in bytes (the caller adds the runtime overhead)."""
    width = model.width or REAL_WIDTH
    per_weight = weight_bytes(cfg, compute_bytes)
    swapped = swapped_weights(cfg, BLOCKS, BLOCKS * block_params(width), model.params)
    parts: dict[str, float] = {"transformer weights": (model.params - swapped) * per_weight}
    if not cfg.cache_text_encoder_outputs:
        parts["text encoder weights"] = max(0, model.extra_params - FLUX_AE) * compute_bytes
    if not caching_latents(cfg):
        parts["VAE weights"] = FLUX_AE * 4
    parts["LoRA + optimizer"] = lora_params(cfg.lora_rank, width) * lora_state_bytes
    scale = compute_bytes / 2 * width / REAL_WIDTH
    tokens = ((cfg.resolution // 16) ** 2 + TEXT_TOKENS) * cfg.batch_size
    passes = MAIN_LAYERS + REFINERS  # main layers on all tokens; each refiner kind on its own tokens
    block = BLOCK_BYTES_PER_TOKEN * REAL_WIDTH * tokens
    parts["activations"] = block_activations(cfg, passes=passes, width=REAL_WIDTH, tokens=tokens, block=block,
                                             scale=scale)
    # Backward: a few tensors of the widest Linear output (the MLP's 8h/3, twice: w1 and w3), and
    # the dequantized copy of the largest frozen weight when it is stored in fp8 / NF4.
    transient = 3 * tokens * 2 * int(width / 3 * 8) * compute_bytes
    if per_weight < compute_bytes:
        transient += width * int(width / 3 * 8) * compute_bytes
    return transient_and_latents(parts, cfg, device, transient=transient, cached_images=cached_images)
