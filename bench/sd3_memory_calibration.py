"""Where core/families/sd3/memory.py's activation numbers come from (bench/memory_calibration.py's method).

The real SD3.5 medium / large SD3Transformer2DModel (published configs, random weights) on the `meta`
device in bf16, the LoRA targets trainable, attention replaced by a flash-style function that saves
what flash SDPA saves, and every tensor autograd keeps counted once. At 1024 px: 4096 image tokens
(128 x 128 latents in 2 x 2 patches) plus 333 text tokens (77 CLIP + 256 T5). Prints bytes per token
with and without gradient checkpointing, and one block alone (what checkpointing recomputes).

    .venv/bin/python bench/sd3_memory_calibration.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.memory_calibration import FlashLikeAttention, SavedTensors

IMAGE_TOKENS, TEXT_TOKENS = 4096, 333


def measure(model_type: str) -> dict[str, float]:
    """{"kept", "kept_gc", "block"}: bytes per token (image + text) at 1024 px, bf16."""
    from core.families.sd3.family import lora_targets
    from core.families.sd3.memory import meta_transformer

    model = meta_transformer(model_type)
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in lora_targets(model):
        modules[name].weight.requires_grad_(True)
    model.to(torch.bfloat16)

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    inputs = dict(hidden_states=empty(1, 16, 128, 128), encoder_hidden_states=empty(1, TEXT_TOKENS, 4096),
                  pooled_projections=empty(1, 2048), timestep=empty(1), return_dict=False)
    tokens = IMAGE_TOKENS + TEXT_TOKENS
    out = {}
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda query, key, value, *a, **kw: FlashLikeAttention.apply(query, key, value)
    try:
        for checkpointing in (False, True):
            if checkpointing:
                model.enable_gradient_checkpointing()
            counter = SavedTensors(model)
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                model(**inputs)
            out["kept_gc" if checkpointing else "kept"] = counter.total() / tokens
        model.disable_gradient_checkpointing()
        width = model.config.num_attention_heads * model.config.attention_head_dim
        counter = SavedTensors(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model.transformer_blocks[0](hidden_states=empty(1, IMAGE_TOKENS, width).requires_grad_(),
                                        encoder_hidden_states=empty(1, TEXT_TOKENS, width).requires_grad_(),
                                        temb=empty(1, width))
        out["block"] = counter.total() / tokens
    finally:
        F.scaled_dot_product_attention = real
    return out


def main() -> None:
    from core.families.sd3.memory import ACTIVATION

    for model_type in ("5-medium", "5-large"):
        got = measure(model_type)
        print(f"{model_type}: " + ", ".join(f"{k} {v:,.0f} B/token ({v * (IMAGE_TOKENS + TEXT_TOKENS) / 2**30:.3f} "
                                            f"GiB at 1024 px)" for k, v in got.items()))
        print(f"  core/families/sd3/memory.py holds: {ACTIVATION[model_type]}")


if __name__ == "__main__":
    main()
