"""One place that turns the config's LoRA settings into a PEFT `LoraConfig`.

Image and text training share it, so every variant (LoRA, DoRA, rsLoRA, PiSSA) and the
conv (LoCon) ranks mean the same thing everywhere.
"""
from __future__ import annotations

from typing import Any

from peft import LoraConfig

from core.config import TrainConfig

# Attention projections of diffusers' UNet and CLIP text encoders.
UNET_ATTENTION_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Attention + MLP projections of Llama-style causal LMs (also Qwen, Mistral, SmolLM).
LLM_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def variant_kwargs(variant: str) -> dict[str, Any]:
    """PEFT switches for a `lora_variant`."""
    if variant == "dora":
        return {"use_dora": True}
    if variant == "rslora":
        return {"use_rslora": True}
    if variant == "pissa":
        # Fast randomized SVD init (the exact one costs minutes on big layers).
        return {"init_lora_weights": "pissa_niter_4"}
    return {"init_lora_weights": "gaussian"}


def make_lora_config(cfg: TrainConfig, target_modules: list[str], *,
                     conv_modules: list[str] | None = None, task_type: str | None = None) -> LoraConfig:
    """A LoraConfig for `target_modules` (plus LoCon conv modules at their own rank/alpha)."""
    targets = list(cfg.target_modules or target_modules)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if conv_modules and cfg.conv_rank > 0:
        for name in conv_modules:
            targets.append(name)
            # Anchor the pattern so it only matches that exact module path.
            rank_pattern[f"^{name}$"] = cfg.conv_rank
            alpha_pattern[f"^{name}$"] = cfg.conv_alpha or cfg.conv_rank
    kwargs: dict[str, Any] = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=targets, rank_pattern=rank_pattern,
                                  alpha_pattern=alpha_pattern, **variant_kwargs(cfg.lora_variant))
    if task_type:
        kwargs["task_type"] = task_type
    return LoraConfig(**kwargs)
