"""Predicted peak memory of a Qwen-Image (Edit) LoRA run, by part (registry `memory_parts`).

Parts as for FLUX (core/families/flux/memory.py): the frozen transformer in its storage dtype (bf16, fp8 with
`fp8_base`, NF4) less what `blocks_to_swap` keeps in CPU memory, Qwen2.5-VL unless its outputs are
cached (they always are: it is freed after encoding), the VAE unless latents are cached, the LoRA with
its gradient and optimizer state, the activations and the backward transient.

Activations: bench/qwen_memory_calibration.py (the real transformer on the meta device, bf16, LoRA
targets trainable, flash-style attention, every saved tensor counted once) at 1024 x 1024 px: 4096
image tokens + 256 text tokens. Whole model without checkpointing 32.95 GiB; with checkpointing
1.52 GiB kept plus 0.55 GiB for the one block recomputed in the backward pass. Edit doubles the
image tokens (the control image's are appended).
"""
from __future__ import annotations

from core.config import TrainConfig
from core.families.dit.memory_parts import swapped_weights, weight_bytes, caching_latents, transient_and_latents
from core.devices import GIB, DeviceInfo
from core.family_api.registry import FAMILIES, QWEN25_VL_7B, QWEN_IMAGE_VAE
from core.model_info import ModelInfo

MEASURED_TOKENS = 64 * 64 + 256
QWEN_ACTIVATION = (32.953 * GIB / MEASURED_TOKENS, 1.518 * GIB / MEASURED_TOKENS, 0.551 * GIB / MEASURED_TOKENS)
TEXT_TOKENS = 256           # a long caption after the template (the pipelines allow 512)
REAL_WIDTH = 3072
BLOCKS = 60
# LoRA (in + out) features per block in units of h: 8 attention projections (h -> h) and two MLPs
# per stream (h -> 4h -> h), image and text.
LORA_FEATURES_PER_H = 8 * 2 + 2 * 2 * 5
BLOCK_WEIGHTS_PER_H2 = 8 + 2 * 8 + 2 * 6   # attention, two MLPs (4h), two modulations (h -> 6h)


def qwen_lora_params(rank: int, width: int = REAL_WIDTH, blocks: int = BLOCKS) -> int:
    return rank * width * LORA_FEATURES_PER_H * blocks



def swapped_params(cfg: TrainConfig, width: int, params: int) -> float:
    """Weights `blocks_to_swap` keeps off the GPU, less the two blocks in flight."""
    return swapped_weights(cfg, BLOCKS, BLOCKS * BLOCK_WEIGHTS_PER_H2 * width * width, params)


def qwen_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int,
               lora_state_bytes: int, cached_images: int) -> dict[str, float]:
    """Every part in bytes (the caller adds the runtime overhead)."""
    width = model.width or REAL_WIDTH
    per_weight = weight_bytes(cfg, compute_bytes)
    parts: dict[str, float] = {}
    parts["transformer weights"] = (model.params - swapped_params(cfg, width, model.params)) * per_weight
    if not cfg.cache_text_encoder_outputs:
        parts["text encoder weights"] = QWEN25_VL_7B * compute_bytes
    if not caching_latents(cfg):
        parts["VAE weights"] = QWEN_IMAGE_VAE * 4
    blocks = BLOCKS if width == REAL_WIDTH else max(1, round(model.params / (BLOCK_WEIGHTS_PER_H2 * width * width)))
    parts["LoRA + optimizer"] = qwen_lora_params(cfg.lora_rank, width, blocks) * lora_state_bytes
    scale = compute_bytes / 2 * width / REAL_WIDTH
    # An edit's reference tokens beside the target's (Edit Plus: counted for one reference, the common case).
    info = FAMILIES.get(model.family)
    image_tokens = (cfg.resolution // 16) ** 2 * (2 if info and (info.needs_control or info.max_references) else 1)
    tokens = (image_tokens + TEXT_TOKENS) * cfg.batch_size
    kept, kept_gc, block = QWEN_ACTIVATION
    parts["activations"] = tokens * ((kept_gc + block) if cfg.gradient_checkpointing else kept) * scale
    # Backward: a few tensors of the widest Linear output (the MLP's 4h), and the dequantized copy of
    # the largest frozen weight (a modulation Linear, h x 6h) when it is stored in fp8 / NF4.
    transient = 3 * tokens * 4 * width * compute_bytes
    if per_weight < compute_bytes:
        transient += 6 * width * width * compute_bytes
    return transient_and_latents(parts, cfg, device, transient=transient, cached_images=cached_images, vae_width=96)
