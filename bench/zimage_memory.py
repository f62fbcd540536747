"""Where core/families/zimage/memory.py's activation numbers come from.

bench/memory_calibration.py's method on real CPU tensors (Z-Image's forward builds its token
lists with data-dependent lengths, which the meta device cannot run): the real width (3840,
30 heads) with 1 and 2 main layers and one refiner of each kind, bf16, LoRA-like trainable
attention + MLP weights, attention replaced by a flash-style function that saves q, k, v, the
output and a float32 log-sum-exp, every tensor autograd saves counted once. The difference of
the two models is one main block; the 1-layer model minus one block is the rest (embedders,
refiners, final layer). Prints bytes per token per block, with and without checkpointing.

    .venv/bin/python bench/zimage_memory.py [image_side_px]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.memory_calibration import FlashLikeAttention, SavedTensors


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return FlashLikeAttention.apply(query, key, value)


def measure(n_layers: int, side_px: int, text_tokens: int, checkpointing: bool) -> int:
    from diffusers import ZImageTransformer2DModel

    from core.families.zimage.load import lora_targets

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(n_layers=n_layers, n_refiner_layers=1).to(torch.bfloat16)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in lora_targets(model):
        modules[name].weight.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    side = side_px // 8
    x = [torch.zeros(16, 1, side, side, dtype=torch.bfloat16)]
    cap = [torch.zeros(text_tokens, 2560, dtype=torch.bfloat16)]
    counter = SavedTensors(model)
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(x, torch.tensor([0.5], dtype=torch.bfloat16), cap, return_dict=False)
    finally:
        F.scaled_dot_product_attention = real
    return counter.total()


def main() -> None:
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    text = 128
    image = (side // 16) ** 2
    for checkpointing in (False, True):
        one, two = measure(1, side, text, checkpointing), measure(2, side, text, checkpointing)
        block = two - one
        print(f"{side} px ({image} image + {text} text tokens), checkpointing {'on ' if checkpointing else 'off'}: "
              f"one main block {block / 2**20:.1f} MiB = {block / (image + text):,.0f} bytes/token; "
              f"rest (refiners, embedders, final) {(one - block) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
