"""Predicted peak memory of an SD3 / SD3.5 LoRA run, by part (the registry rows' `memory_parts`).

Parts as for FLUX (core.families.flux.memory): the frozen MMDiT in its storage dtype (bf16, fp8 with `fp8_base`,
NF4 with `base_quantization: nf4`) less what `blocks_to_swap` keeps in CPU memory, the text encoders
unless their outputs are cached (always, for SD3), the VAE unless latents are cached, the LoRA with its
gradient and optimizer state, the activations and the backward transient.

Activations: bench/sd3_memory_calibration.py (bench/memory_calibration.py's method: the real
SD3Transformer2DModel on the `meta` device in bf16, LoRA targets trainable, flash-style attention,
every tensor autograd saves counted once) at 1024 px: 4096 image tokens + 333 text tokens. Bytes per
token: whole model, with checkpointing (block inputs), one block recomputed in the backward pass.
LoRA sizes are counted from the real shapes on the meta device (`lora_params`).
"""
from __future__ import annotations

from functools import cache

import torch

from core.config import TrainConfig
from core.families.dit.memory_parts import swapped_weights, weight_bytes, caching_latents, transient_and_latents
from core.devices import DeviceInfo
from core.family_api.registry import FAMILIES, FLUX_AE, SD3_ENCODERS
from core.model_info import ModelInfo

TEXT_TOKENS = 77 + 256       # CLIP-L/G (77) + T5 (256), concatenated along the sequence
# (kept, kept with checkpointing, one block) bytes per token at the real width, bf16 (see the docstring).
# Measured: medium 8.71 GiB whole, 0.316 GiB kept with checkpointing, 0.423 GiB for block 0 (a dual-attention
# block, the largest); large 17.60 GiB, 0.781 GiB, 0.463 GiB.
ACTIVATION = {"5-medium": (2_110_524, 76_578, 102_492), "5-large": (4_265_707, 189_340, 112_362)}
ACTIVATION["medium"] = ACTIVATION["5-medium"]
_MODEL_TYPE = {"sd3": "5-medium", "sd35-large": "5-large"}

# The real transformers (their diffusers configs): SD3.5 medium (dual attention in blocks 0-12) and large.
_BASE = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
             pooled_projection_dim=2048, out_channels=16)
CONFIGS = {
    "5-medium": dict(_BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                     pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "medium": dict(_BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "5-large": dict(_BASE, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                    pos_embed_max_size=192, qk_norm="rms_norm"),
}


def meta_transformer(model_type: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**CONFIGS[model_type])


@cache
def shape_counts(model_type: str) -> dict[str, int]:
    """Real-size counts from the meta model: total, blocks, per_block (the largest), lora_per_rank."""
    from core.families.sd3.family import lora_targets

    model = meta_transformer(model_type)
    modules = dict(model.named_modules())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks]
    lora = sum(modules[n].in_features + modules[n].out_features for n in lora_targets(model))
    return {"total": sum(p.numel() for p in model.parameters()), "blocks": len(blocks), "per_block": max(blocks),
            "all_blocks": sum(blocks), "lora_per_rank": lora,
            "width": model.config.num_attention_heads * model.config.attention_head_dim}


def lora_params(family: str, rank: int) -> int:
    return rank * shape_counts(_MODEL_TYPE.get(family, "5-medium"))["lora_per_rank"]



def sd3_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int,
              lora_state_bytes: int, cached_images: int) -> dict[str, float]:
    """Every part in bytes (the caller adds the runtime overhead)."""
    model_type = _MODEL_TYPE.get(model.family, "5-medium")
    counts = shape_counts(model_type)
    real_width = FAMILIES[model.family].width if model.family in FAMILIES else counts["width"]
    width = model.width or real_width
    per_weight = weight_bytes(cfg, compute_bytes)
    parts: dict[str, float] = {}
    swapped = swapped_weights(cfg, counts["blocks"], counts["all_blocks"], model.params, in_flight=counts["per_block"])
    parts["transformer weights"] = (model.params - swapped) * per_weight
    if not cfg.cache_text_encoder_outputs:
        parts["text encoder weights"] = max(0, (model.extra_params or SD3_ENCODERS) - FLUX_AE) * compute_bytes
    if not caching_latents(cfg):
        parts["VAE weights"] = FLUX_AE * 4
    scale = width / real_width  # tiny test models are narrower than the real ones
    parts["LoRA + optimizer"] = lora_params(model.family, cfg.lora_rank) * scale * lora_state_bytes
    tokens = ((cfg.resolution // 16) ** 2 + TEXT_TOKENS) * cfg.batch_size
    kept, kept_gc, block = ACTIVATION[model_type]
    parts["activations"] = tokens * ((kept_gc + block) if cfg.gradient_checkpointing else kept) * \
        compute_bytes / 2 * scale
    # Backward: a few tensors of the widest Linear output (the MLP's 4h; qkv's 3h), plus the
    # dequantized copy of the largest frozen weight when it is stored in fp8 / NF4.
    transient = 3 * tokens * 4 * width * compute_bytes
    if per_weight < compute_bytes:
        transient += 4 * width * width * compute_bytes
    return transient_and_latents(parts, cfg, device, transient=transient, cached_images=cached_images)
