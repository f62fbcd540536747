"""One place that turns the config's LoRA settings into a PEFT `LoraConfig`, and reads and writes
the LoRA state of an adapted module.

Image and text training and every image family share it, so every variant (LoRA, DoRA, rsLoRA,
PiSSA) and the conv (LoCon) ranks mean the same thing everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

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


# LyCORIS adapters, built on PEFT's LoKrConfig / LoHaConfig (core.export.lycoris writes their files).
LYCORIS_VARIANTS = ("lokr", "loha")
# lokr_full_matrix: a rank no layer reaches makes PEFT keep both Kronecker factors whole.
_FULL_RANK = 1 << 20


def is_lycoris(cfg: TrainConfig) -> bool:
    return cfg.lora_variant in LYCORIS_VARIANTS


def make_lora_config(cfg: TrainConfig, target_modules: list[str], *,
                     conv_modules: list[str] | None = None, task_type: str | None = None) -> Any:
    """A LoraConfig for `target_modules` (plus LoCon conv modules at their own rank/alpha); a
    LoKrConfig / LoHaConfig for `lora_variant: lokr / loha`."""
    targets = list(cfg.target_modules or target_modules)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if conv_modules and cfg.conv_rank > 0:
        for name in conv_modules:
            targets.append(name)
            # Anchor the pattern so it only matches that exact module path.
            rank_pattern[f"^{name}$"] = cfg.conv_rank
            alpha_pattern[f"^{name}$"] = cfg.conv_alpha or cfg.conv_rank
    if is_lycoris(cfg):
        return _lycoris_config(cfg, targets, rank_pattern, alpha_pattern, task_type)
    kwargs: dict[str, Any] = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=targets, rank_pattern=rank_pattern,
                                  alpha_pattern=alpha_pattern, **variant_kwargs(cfg.lora_variant))
    if task_type:
        kwargs["task_type"] = task_type
    return LoraConfig(**kwargs)


def lycoris_config(cfg: TrainConfig, targets: list[str]) -> Any:
    """The LoKrConfig / LoHaConfig of `lora_variant: lokr / loha` on exactly `targets` (one rank and alpha)."""
    return _lycoris_config(cfg, list(targets), {}, {}, None)


def _lycoris_config(cfg: TrainConfig, targets: list[str], rank_pattern: dict[str, int],
                    alpha_pattern: dict[str, float], task_type: str | None) -> Any:
    """PEFT's LoKr / LoHa with the settings LyCORIS users know.

    `lora_dropout` is LyCORIS' rank dropout (PEFT's LoKr/LoHa have no input dropout). LoKr:
    `lokr_factor` is LyCORIS' `factor` (-1: split each dimension near its square root),
    `lokr_decompose_both` also factors w1 at the rank, `lokr_full_matrix` keeps w1 and w2 whole
    (no rank; alpha/rank still scales the update and is baked into the file).
    """
    from peft import LoHaConfig, LoKrConfig

    r, alpha = cfg.lora_rank, cfg.lora_alpha
    if cfg.lora_variant == "lokr" and cfg.lokr_full_matrix:
        # Same scale alpha/r with a rank no layer reaches: PEFT then keeps both factors whole.
        alpha_pattern = {k: alpha_pattern[k] * _FULL_RANK / v for k, v in rank_pattern.items()}
        rank_pattern = {k: _FULL_RANK for k in rank_pattern}
        r, alpha = _FULL_RANK, alpha * _FULL_RANK / r
    kwargs: dict[str, Any] = dict(r=r, alpha=alpha, rank_dropout=cfg.lora_dropout, target_modules=targets,
                                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if task_type:
        kwargs["task_type"] = task_type
    if cfg.lora_variant == "loha":
        return LoHaConfig(**kwargs)
    return LoKrConfig(**kwargs, decompose_both=cfg.lokr_decompose_both, decompose_factor=cfg.lokr_factor)


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_peft_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """Put LoRA weights into an adapted model; returns the adapter keys the file did not have."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if any(p in k for p in ("lora_", "lokr_", "hada_"))]
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"The LoRA weights for the {what} do not fit the model: {unexpected[:3]} ... "
                         "(another base model family or different target modules).")
    return missing


def pissa_to_lora(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PiSSA moved the principal part out of the base weights; as a LoRA for the ORIGINAL base the
    update is s(BA - B0A0), i.e. rank 2r with A' = [A; A0], B' = [B, -B0] (PEFT's own conversion)."""
    out = {}
    for key, value in state.items():
        if ".lora_A." in key:
            out[key] = torch.cat([value, initial[key]], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -initial[key]], dim=1)
        else:
            out[key] = value
    return out


def doubled_config(config: Any) -> Any:
    """The LoraConfig of a PiSSA LoRA converted to rank 2r (same scale: alpha doubles too)."""
    return dataclasses.replace(config, r=config.r * 2, lora_alpha=config.lora_alpha * 2,
                               rank_pattern={k: v * 2 for k, v in (config.rank_pattern or {}).items()},
                               alpha_pattern={k: v * 2 for k, v in (config.alpha_pattern or {}).items()},
                               init_lora_weights=True)
