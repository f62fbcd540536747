"""Predicted peak memory of a FLUX.1 / Chroma LoRA run, by part (the FLUX half of core.memory).

Parts: the frozen transformer in its storage dtype (bf16, fp8 with `fp8_base`, NF4 with
`base_quantization: nf4`) less the share of its blocks `blocks_to_swap` keeps in CPU memory,
the text encoders unless their outputs are cached, the AE unless latents are cached, the
LoRA with its gradient and optimizer state, the activations, and the backward transient.

Where the activation numbers come from: bench/memory_calibration.py's method (the real
FluxTransformer2DModel on the `meta` device in bf16, LoRA-like trainable targets, flash-style
attention, every tensor autograd saves counted once) at 1024 x 1024 px: 4096 image tokens plus
512 T5 tokens. Whole model without checkpointing 29.14 GiB; with checkpointing 1.53 GiB kept
plus 0.53 GiB for the largest block recomputed (a double block).

LoRA sizes are closed forms of the architecture (tests/families/flux/test_flux_memory.py checks them against
`core.families.flux.flux_param_counts`, which builds the real model on the meta device).
"""
from __future__ import annotations

from core.config import TrainConfig
from core.families.dit.memory_parts import swapped_weights, weight_bytes, caching_latents, transient_and_latents
from core.devices import GIB, DeviceInfo
from core.family_api.registry import FAMILIES, FLUX_AE
from core.model_info import ModelInfo

# Tokens of the measurement: (1024 / 16)^2 packed image tokens + 512 text tokens.
MEASURED_TOKENS = 64 * 64 + 512
# Bytes autograd saves per token (image + text) at width 3072 in bf16: no checkpointing,
# with checkpointing (block inputs), the largest block recomputed during the backward pass.
FLUX_ACTIVATION = (29.14 * GIB / MEASURED_TOKENS, 1.53 * GIB / MEASURED_TOKENS, 0.533 * GIB / MEASURED_TOKENS)
TEXT_TOKENS = 512            # T5 sequence length while training (FLUX.1-dev and Chroma; schnell uses 256)
REAL_WIDTH = 3072
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
# Storage bytes per frozen weight. NF4: 4 bits plus one fp32 absmax per block of 64 (no double quantization).
# LoRA (in + out) features per block, in units of the width h, for each `lora_blocks` choice:
# double block: 8 attention projections (h -> h) and two MLPs (h -> 4h -> h); single block:
# q/k/v (h -> h), proj_mlp (h -> 4h) and proj_out (5h -> h).
LORA_FEATURES_PER_H = {"all": (8 * 2 + 2 * (5 + 5), 3 * 2 + 5 + 6),
                       "attention": (8 * 2, 3 * 2),
                       "single_blocks": (0, 3 * 2 + 5 + 6)}
# (double, single) block weights in units of h^2, by family: FLUX.1 with the adaLN modulation
# Linears, Chroma without them (its one approximator replaces them).
BLOCK_WEIGHTS_PER_H2 = {"flux-dev": (36, 15), "flux-schnell": (36, 15), "chroma": (24, 12)}


def flux_lora_params(rank: int, lora_blocks: str = "all", width: int = REAL_WIDTH) -> int:
    """Parameters of a rank-`rank` FLUX LoRA: rank x (in + out) summed over the targets."""
    double, single = LORA_FEATURES_PER_H.get(lora_blocks, LORA_FEATURES_PER_H["all"])
    return rank * width * (DOUBLE_BLOCKS * double + SINGLE_BLOCKS * single)


def block_params(family: str, width: int = REAL_WIDTH) -> tuple[int, int]:
    """(one double block, one single block) weight counts, biases left out (under 0.1%)."""
    double, single = BLOCK_WEIGHTS_PER_H2.get(family, BLOCK_WEIGHTS_PER_H2["flux-dev"])
    return double * width * width, single * width * width



def swapped_params(cfg: TrainConfig, family: str, width: int, params: int) -> float:
    """Weights `blocks_to_swap` keeps off the GPU, of the 57 blocks (a double block is the larger in flight)."""
    double, single = block_params(family, width)
    return swapped_weights(cfg, DOUBLE_BLOCKS + SINGLE_BLOCKS, DOUBLE_BLOCKS * double + SINGLE_BLOCKS * single, params,
                           in_flight=double)


def flux_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int,
               lora_state_bytes: int, cached_images: int) -> dict[str, float]:
    """Every part in bytes (the caller adds the runtime overhead)."""
    width = model.width or REAL_WIDTH
    per_weight = weight_bytes(cfg, compute_bytes)
    parts: dict[str, float] = {}
    on_gpu = model.params - swapped_params(cfg, model.family, width, model.params)
    parts["transformer weights"] = on_gpu * per_weight
    if not cfg.cache_text_encoder_outputs:
        # T5-XXL (and CLIP-L) stay loaded in the compute dtype to encode each caption.
        parts["text encoder weights"] = max(0, model.extra_params - FLUX_AE) * compute_bytes
    if not caching_latents(cfg):
        parts["VAE weights"] = FLUX_AE * 4  # the AE encodes in fp32, like the SD VAE
    lora = flux_lora_params(cfg.lora_rank, cfg.lora_blocks, width)
    parts["LoRA + optimizer"] = lora * lora_state_bytes
    scale = compute_bytes / 2 * width / REAL_WIDTH  # tiny test models are narrower than the real ones
    # A pair-trained variant (FLUX.1 Kontext) appends the control image's tokens to the target's.
    pairs = 2 if getattr(FAMILIES.get(model.family), "needs_control", False) else 1
    tokens = ((cfg.resolution // 16) ** 2 * pairs + TEXT_TOKENS) * cfg.batch_size
    kept, kept_gc, block = FLUX_ACTIVATION
    activations = tokens * ((kept_gc + block) if cfg.gradient_checkpointing else kept) * scale
    if cfg.lora_variant == "dora":
        activations *= 1.15  # as for the UNets: DoRA keeps each adapted layer's weight norm
    parts["activations"] = activations
    # Backward: a few tensors of the widest Linear output (single block linear1: 3h + 4h), and the
    # dequantized copy of the largest frozen weight when it is stored in fp8 / NF4.
    transient = 3 * tokens * 7 * width * compute_bytes
    if per_weight < compute_bytes:
        transient += 7 * width * width * compute_bytes
    return transient_and_latents(parts, cfg, device, transient=transient, cached_images=cached_images)

