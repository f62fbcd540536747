"""Predicted peak memory of a FLUX.2 LoRA run, by part (the registry row's `memory_parts`).

Parts as for FLUX.1 (core/families/flux/memory.py): the frozen transformer in its storage dtype (bf16,
fp8 with `fp8_base`, NF4 with `base_quantization: nf4`) less what `blocks_to_swap` keeps in CPU memory,
the text encoder unless its outputs are cached (always here: the family frees it), the VAE unless latents
are cached, the LoRA with its gradient and optimizer state, the activations and the backward transient.

Shapes: the block counts and widths are the real networks' (klein 4B: 5 + 20 blocks of width 3072; 9B: 8 + 24
of 4096; dev: 8 + 48 of 6144), and `flux2_lora_params` is the closed form of our targets, which
tests/families/flux2/test_flux2_memory.py checks against the real Flux2Transformer2DModel built on the meta
device. Activations per token and block: FLUX.1's calibration (bench/memory_calibration.py, 29.14 GiB for 57
blocks and 4608 tokens at width 3072 in bf16; with checkpointing each block's input) scaled by the width;
a FLUX.2 block has the same Linears' widths in sum (SwiGLU 2 x 3h in, 3h out vs FLUX.1's 4h and 4h).
Text tokens: 512 (the pipeline pads every prompt to 512 and the transformer sees them all).
"""
from __future__ import annotations

from core.config import TrainConfig
from core.devices import GIB, DeviceInfo
from core.families.dit.memory_parts import caching_latents, transient_and_latents
from core.family_api.registry import FLUX2_VAE
from core.model_info import ModelInfo

SHAPES = {3072: (5, 20), 4096: (8, 24), 6144: (8, 48)}   # width -> (double, single) blocks
TEXT_TOKENS = 512
_FLUX1_BLOCKS, _FLUX1_TOKENS, _FLUX1_WIDTH = 57, 64 * 64 + 512, 3072
BLOCK_BYTES_PER_TOKEN = 29.14 * GIB / (_FLUX1_BLOCKS * _FLUX1_TOKENS) / _FLUX1_WIDTH  # per unit of width, bf16
WEIGHT_BYTES = {"fp8": 1.0, "nf4": 0.5 + 4 / 64}


def blocks_of(width: int) -> tuple[int, int]:
    """(double, single) blocks of the real network of this width (the nearest; tiny models count as klein 4B)."""
    return SHAPES[min(SHAPES, key=lambda w: abs(w - width))]


def flux2_lora_params(rank: int, width: int, double: int, single: int) -> int:
    """rank x (in + out) of every target: a double block's 8 attention projections (h -> h) and two SwiGLU
    MLPs (h -> 6h, 3h -> h); a single block's linear1 (h -> 3h + 6h) and linear2 (h + 3h -> h)."""
    per_double = 8 * 2 * width + 2 * ((width + 6 * width) + (3 * width + width))
    per_single = (width + 9 * width) + (4 * width + width)
    return rank * (double * per_double + single * per_single)


def block_params(width: int) -> tuple[int, int]:
    """(one double block, one single block) weight counts: 8h^2 attention + 2 x 9h^2 MLP; 9h^2 + 4h^2."""
    return 26 * width * width, 13 * width * width


def flux2_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int,
                lora_state_bytes: int, cached_images: int) -> dict[str, float]:
    """Every part in bytes (the caller adds the runtime overhead)."""
    width = model.width or 3072
    double, single = blocks_of(width)
    per_weight = (WEIGHT_BYTES["nf4"] if cfg.base_quantization == "nf4"
                  else WEIGHT_BYTES["fp8"] if cfg.fp8_base else float(compute_bytes))
    swapped = 0.0
    if cfg.blocks_to_swap > 0:
        d, s = block_params(width)
        blocks = min(cfg.blocks_to_swap, double + single)
        all_blocks = min(model.params, double * d + single * s)
        swapped = max(0.0, all_blocks * blocks / (double + single) - 2 * d)
    parts: dict[str, float] = {"transformer weights": (model.params - swapped) * per_weight}
    if not cfg.cache_text_encoder_outputs:
        parts["text encoder weights"] = max(0, model.extra_params - FLUX2_VAE) * compute_bytes
    if not caching_latents(cfg):
        parts["VAE weights"] = FLUX2_VAE * 4
    parts["LoRA + optimizer"] = flux2_lora_params(cfg.lora_rank, width, double, single) * lora_state_bytes
    scale = compute_bytes / 2
    tokens = ((cfg.resolution // 16) ** 2 + TEXT_TOKENS) * cfg.batch_size
    block = BLOCK_BYTES_PER_TOKEN * width * tokens
    if cfg.gradient_checkpointing:
        activations = ((double + single) * 2 * width * tokens + block) * scale
    else:
        activations = (double + single) * block * scale
    parts["activations"] = activations
    # Backward: a few tensors of the widest Linear output (single linear1: 9h), and the dequantized copy of
    # the largest frozen weight when stored in fp8 / NF4.
    transient = 3 * tokens * 9 * width * compute_bytes
    if per_weight < compute_bytes:
        transient += 9 * width * width * compute_bytes
    return transient_and_latents(parts, cfg, device, transient=transient, cached_images=cached_images,
                                 vae_width=128)
