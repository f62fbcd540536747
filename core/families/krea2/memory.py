"""Predicted peak memory of a Krea 2 LoRA run, by part (the registry row's `memory_parts`).

Parts as for the other transformers: the frozen transformer in its storage dtype less what `blocks_to_swap` keeps
in CPU memory, Qwen3-VL only when its outputs are not cached (they always are: the family frees it), the VAE
unless latents are cached, the LoRA with its gradient and optimizer state, the activations and the backward
transient. Shapes are the real network's (28 blocks of width 6144, 48 query and 12 key/value heads of 128, MLP
16384; text fusion width 2560 with 4 blocks of MLP 6912): `krea2_lora_params` is the closed form of our targets,
which tests/families/krea2/ checks against Krea2Transformer2DModel built on the meta device. Activations per token
and block: FLUX.1's calibration (core/families/flux/memory.py) per unit of width, with 512 text tokens.
"""
from __future__ import annotations

from core.config import TrainConfig
from core.devices import GIB, DeviceInfo
from core.families.dit.memory_parts import block_activations, caching_latents, transient_and_latents
from core.family_api.registry import QWEN_IMAGE_VAE
from core.model_info import ModelInfo

REAL_WIDTH, BLOCKS, KV, MLP = 6144, 28, 1536, 16384
TEXT_WIDTH, TEXT_BLOCKS, TEXT_MLP = 2560, 4, 6912
TEXT_TOKENS = 512
BLOCK_BYTES_PER_TOKEN = 29.14 * GIB / (57 * (64 * 64 + 512)) / 3072  # per unit of width, bf16 (FLUX.1's)
WEIGHT_BYTES = {"fp8": 1.0, "nf4": 0.5 + 4 / 64}


def krea2_lora_params(rank: int, width: int = REAL_WIDTH, kv: int = KV, mlp: int = MLP, blocks: int = BLOCKS,
                      text: int = TEXT_WIDTH, text_mlp: int = TEXT_MLP, text_blocks: int = TEXT_BLOCKS) -> int:
    """rank x (in + out): per block q, gate, out (h -> h), k, v (h -> kv), gate/up (h -> mlp), down (mlp -> h);
    per text-fusion block five t -> t projections and its MLP."""
    block = 3 * 2 * width + 2 * (width + kv) + 2 * (width + mlp) + (mlp + width)
    text_block = 5 * 2 * text + 2 * (text + text_mlp) + (text_mlp + text)
    return rank * (blocks * block + text_blocks * text_block)


def block_params(width: int = REAL_WIDTH) -> int:
    """Weights of one block: attention (3 h^2 + 2 h kv) and MLP (3 h mlp), in the real proportions."""
    return 3 * width * width + 2 * width * (width * KV // REAL_WIDTH) + 3 * width * (width * MLP // REAL_WIDTH)


def krea2_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int,
                lora_state_bytes: int, cached_images: int) -> dict[str, float]:
    width = model.width or REAL_WIDTH
    ratio = width / REAL_WIDTH
    per_weight = (WEIGHT_BYTES["nf4"] if cfg.base_quantization == "nf4"
                  else WEIGHT_BYTES["fp8"] if cfg.fp8_base else float(compute_bytes))
    swapped = 0.0
    if cfg.blocks_to_swap > 0:
        blocks = min(cfg.blocks_to_swap, BLOCKS)
        swapped = max(0.0, min(model.params, BLOCKS * block_params(width)) * blocks / BLOCKS - 2 * block_params(width))
    parts: dict[str, float] = {"transformer weights": (model.params - swapped) * per_weight}
    if not cfg.cache_text_encoder_outputs:
        parts["text encoder weights"] = max(0, model.extra_params - QWEN_IMAGE_VAE) * compute_bytes
    if not caching_latents(cfg):
        parts["VAE weights"] = QWEN_IMAGE_VAE * 4
    parts["LoRA + optimizer"] = krea2_lora_params(cfg.lora_rank, width, int(KV * ratio), int(MLP * ratio),
                                                  text=max(1, int(TEXT_WIDTH * ratio)),
                                                  text_mlp=max(1, int(TEXT_MLP * ratio))) * lora_state_bytes
    scale = compute_bytes / 2
    tokens = ((cfg.resolution // 16) ** 2 + TEXT_TOKENS) * cfg.batch_size
    block = BLOCK_BYTES_PER_TOKEN * width * tokens
    parts["activations"] = block_activations(cfg, passes=BLOCKS, width=width, tokens=tokens, block=block, scale=scale)
    transient = 3 * tokens * int(MLP * ratio) * compute_bytes
    if per_weight < compute_bytes:
        transient += width * int(MLP * ratio) * compute_bytes
    return transient_and_latents(parts, cfg, device, transient=transient, cached_images=cached_images, vae_width=96)
