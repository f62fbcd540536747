"""Predicted peak memory of a Wan LoRA run, by part (the registry row's `memory_parts`).

Parts as for the other transformer families: the frozen transformer in its storage dtype (bf16, fp8 with
`fp8_base`, NF4) less what `blocks_to_swap` keeps in CPU memory, UMT5 unless its outputs are cached (always
here: the family frees it), the VAE unless latents are cached, the LoRA with its gradient and optimizer state,
the activations and the backward transient.

Tokens: a clip of F frames (4k+1) is (F - 1) / 4 + 1 latent frames of (side / 16)^2 patches each; the 512
text tokens (Wan 2.1 I2V: and 257 image tokens) are attended to in every block's cross-attention. The I2V
models' 36 input channels change only the patch embedding; Wan 2.1 I2V's k_img / v_img are in its parameters.
Wan 2.2 TI2V-5B (width 3072, 30 blocks, FFN 14336) has a 16x VAE: 32 px per patch.
Activations per image token and block: what a real `WanTransformerBlock` keeps for the backward pass, measured
with autograd's saved-tensor hooks in bf16 on the CPU at two widths (256 / FFN 691 and 512 / FFN 896: 14,456
and 26,420 bytes per token) and fitted as 21.3 x width + 2.56 x ffn elements (its norms run in fp32, so they count double);
`tests/families/wan/test_wan_memory.py` measures the block again and checks the fit. With checkpointing a
block keeps its input. Wan 2.2 A14B with `wan_expert: both` holds a second expert's weights (unless
`wan_offload_inactive_expert`) and a second LoRA with its optimizer state.
"""
from __future__ import annotations

from core.config import TrainConfig
from core.devices import DeviceInfo
from core.families.dit.memory_parts import caching_latents, transient_and_latents
from core.family_api.registry import family_info
from core.model_info import ModelInfo

# (width, blocks, FFN width) of the real networks, by width.
SHAPES = {1536: (1536, 30, 8960), 3072: (3072, 30, 14336), 5120: (5120, 40, 13824)}  # 1.3B, TI2V-5B, 14B
TI2V_5B = "wan2.2-ti2v-5b"  # its VAE is 16x spatial (and 4x temporal): a quarter of the tokens per frame
TEXT_TOKENS = 512
IMAGE_TOKENS = 257  # Wan 2.1 I2V: the start image's CLIP ViT-H/14 tokens (224 px: 16 x 16 patches + class)
WAN_VAE, UMT5_XXL, WAN22_VAE = 126_892_531, 5_680_910_336, 704_688_668
WEIGHT_BYTES = {"fp8": 1.0, "nf4": 0.5 + 4 / 64}
ELEMENTS_PER_WIDTH, ELEMENTS_PER_FFN = 21.3, 2.56  # fitted on the real block (see above)


def shape_of(width: int) -> tuple[int, int, int]:
    return SHAPES.get(width) or (width, 30 if width < 5120 else 40, int(width * 2.7))


def blocks_of(params: int, width: int) -> int:
    """The model's blocks: the real network's count, or fewer for a cut-down model of the same width (bench/),
    read from its parameters (one block holds most of 1/blocks of them)."""
    _, blocks, ffn = shape_of(width)
    per_block = 4 * 2 * width * width + 2 * width * ffn + 6 * width  # attention q/k/v/o twice, the FFN
    return max(1, min(blocks, round(params / per_block))) if params else blocks


def video_tokens(resolution: int, frames: int, spatial: int = 8) -> int:
    """Patches (2x2 latents) of one clip at `resolution` (square) and `frames` frames; `spatial`: the VAE's."""
    return ((max(frames, 1) - 1) // 4 + 1) * (resolution // (2 * spatial)) ** 2


def lora_params(rank: int, width: int, blocks: int | None = None) -> int:
    """8 attention Linears (w -> w) and the FFN (w -> ffn -> w) of every block: rank x (in + out)."""
    _, real_blocks, ffn = shape_of(width)
    blocks = blocks or real_blocks
    return rank * blocks * (8 * 2 * width + 2 * (width + ffn))


def block_activation_bytes(width: int, compute_bytes: int) -> float:
    """Bytes one block keeps per image token for the backward pass (no checkpointing)."""
    _, _, ffn = shape_of(width)
    return (ELEMENTS_PER_WIDTH * width + ELEMENTS_PER_FFN * ffn) * compute_bytes


def wan_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int,
              lora_state_bytes: int, cached_images: int) -> dict[str, float]:
    """Every part in bytes (the caller adds the runtime overhead)."""
    width, _, ffn = shape_of(model.width or 1536)
    blocks = blocks_of(model.params, width)
    per_weight = (WEIGHT_BYTES["nf4"] if cfg.base_quantization == "nf4"
                  else WEIGHT_BYTES["fp8"] if cfg.fp8_base else float(compute_bytes))
    block_weights = model.params / blocks
    swapped = max(0.0, (min(cfg.blocks_to_swap, blocks) - 2) * block_weights) if cfg.blocks_to_swap > 0 else 0.0
    parts: dict[str, float] = {"transformer weights": (model.params - swapped) * per_weight}
    both = family_info(model.family).two_experts and cfg.wan_expert == "both"
    if both and not (cfg.wan_offload_inactive_expert and cfg.blocks_to_swap == 0):
        # Wan 2.2 A14B, both experts in one run: the other expert's frozen weights stay on the GPU too.
        parts["second expert weights"] = parts["transformer weights"]
    if not cfg.cache_text_encoder_outputs:
        parts["text encoder weights"] = UMT5_XXL * compute_bytes
    ti2v = model.family == TI2V_5B
    if not caching_latents(cfg):
        parts["VAE weights"] = (WAN22_VAE if ti2v else WAN_VAE) * 4
    parts["LoRA + optimizer"] = lora_params(cfg.lora_rank, width, blocks) * lora_state_bytes * (2 if both else 1)
    tokens = video_tokens(cfg.resolution, cfg.video_frames, 16 if ti2v else 8) * cfg.batch_size
    per_block = block_activation_bytes(width, compute_bytes) * tokens
    if cfg.gradient_checkpointing:
        activations = blocks * width * tokens * compute_bytes + per_block
    else:
        activations = blocks * per_block
    # cross-attention keys / values of the text (and Wan 2.1 I2V's 257 CLIP image tokens), per block
    context = TEXT_TOKENS + (IMAGE_TOKENS if model.family == "wan2.1-i2v-14b" else 0)
    activations += blocks * 2 * context * width * compute_bytes * cfg.batch_size
    parts["activations"] = activations
    transient = 3 * tokens * ffn * compute_bytes
    if per_weight < compute_bytes:
        transient += width * ffn * compute_bytes
    return transient_and_latents(parts, cfg, device, transient=transient, cached_images=cached_images)
