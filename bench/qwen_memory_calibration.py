"""Where core/families/qwen_image/memory.py's activation numbers come from (bench/memory_calibration.py's method).

The real QwenImageTransformer2DModel (60 blocks, width 3072; random weights) on the `meta` device in
bf16, the LoRA targets trainable, attention replaced by a flash-style function that saves q, k, v,
the output and a log-sum-exp, every tensor autograd keeps counted once: at 1024 x 1024 px (4096
packed image tokens) plus 256 text tokens; whole model without and with gradient checkpointing, and
one block alone (what checkpointing recomputes).

    .venv/bin/python bench/qwen_memory_calibration.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.memory_calibration import FlashLikeAttention, SavedTensors


def measure(image_side: int = 64, text_tokens: int = 256) -> dict[str, float]:
    from diffusers import QwenImageTransformer2DModel

    from core.families.qwen_image.load import lora_targets

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(num_layers=60, attention_head_dim=128, num_attention_heads=24,
                                            joint_attention_dim=3584, in_channels=64, out_channels=16)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in lora_targets(model):
        modules[name].weight.requires_grad_(True)
    model.to(torch.bfloat16)
    image_tokens = image_side * image_side

    def empty(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    inputs = dict(hidden_states=empty(1, image_tokens, 64), encoder_hidden_states=empty(1, text_tokens, 3584),
                  encoder_hidden_states_mask=None, timestep=empty(1),
                  img_shapes=[[(1, image_side, image_side)]], return_dict=False)
    tokens = image_tokens + text_tokens
    out = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        counter = SavedTensors(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(**inputs)
        out["gc" if checkpointing else "full"] = counter.total()
        print(f"Qwen-Image, checkpointing {'on ' if checkpointing else 'off'}: saved {counter.total() / 2**30:.3f} GiB "
              f"({counter.total() / tokens:,.0f} bytes per token)")
    model.disable_gradient_checkpointing()
    counter = SavedTensors(model)
    width = 3072
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        model.transformer_blocks[0](hidden_states=empty(1, image_tokens, width).requires_grad_(),
                                    encoder_hidden_states=empty(1, text_tokens, width).requires_grad_(),
                                    encoder_hidden_states_mask=None, temb=empty(1, width),
                                    image_rotary_emb=(empty(image_tokens, 64, dtype=torch.complex64),
                                                      empty(text_tokens, 64, dtype=torch.complex64)))
    out["block"] = counter.total()
    print(f"  one block (recomputed with checkpointing): {counter.total() / 2**30:.3f} GiB")
    return out


def main() -> None:
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda query, key, value, *a, **kw: FlashLikeAttention.apply(query, key, value)
    try:
        measure()
    finally:
        F.scaled_dot_product_attention = real_sdpa


if __name__ == "__main__":
    main()
