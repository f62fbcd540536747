"""Which FLUX layers get LoRA, and the parameter counts estimates need.

LoRA presets: `all` (every attention and MLP Linear of both block kinds), `attention`
(q/k/v/out only), `single_blocks` (FluxGym's 12 GB mode: only the 38 single-stream
blocks). The low-memory switches are the shared ones (core.families.dit.low_memory).
"""
from __future__ import annotations

from typing import Any

import torch

LORA_PRESETS = ("all", "attention", "single_blocks")

_DOUBLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_DOUBLE_NORMS = ("norm1.linear", "norm1_context.linear")
_SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")
# proj_out takes [attention output, MLP hidden] concatenated: it is both the attention out and the MLP out.
_SINGLE_MLP = ("proj_mlp", "proj_out")
_SINGLE_NORMS = ("norm.linear",)


def lora_target_suffixes(preset: str = "all", *, include_norms: bool = False) -> dict[str, tuple[str, ...]]:
    """Module names inside each block kind: {"transformer_blocks": (...), "single_transformer_blocks": (...)}."""
    if preset not in LORA_PRESETS:
        raise ValueError(f"Unknown FLUX LoRA preset '{preset}'; choose one of {', '.join(LORA_PRESETS)}.")
    double: tuple[str, ...] = ()
    single: tuple[str, ...] = _SINGLE_ATTENTION
    if preset != "single_blocks":
        double = _DOUBLE_ATTENTION + (_DOUBLE_MLP if preset == "all" else ())
    if preset != "attention":
        single = _SINGLE_ATTENTION + _SINGLE_MLP
    if include_norms:
        # The adaLN modulation Linears (large: 6 x width x width each); off by default like sd-scripts.
        double += _DOUBLE_NORMS if double else ()
        single += _SINGLE_NORMS
    return {"transformer_blocks": double, "single_transformer_blocks": single}


def flux_lora_targets(transformer: torch.nn.Module, preset: str = "all", *, include_norms: bool = False) -> list[str]:
    """Full module names that get LoRA (exact names for PEFT's `target_modules`).

    Full names rather than suffixes, because `attn.to_q` exists in both block kinds and
    the `single_blocks` preset must not touch the double blocks. Only nn.Linear modules
    are returned: Chroma's pruned norms have no Linear and are skipped.
    """
    wanted = lora_target_suffixes(preset, include_norms=include_norms)
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] in wanted and parts[2] in wanted[parts[0]] \
                and isinstance(module, torch.nn.Linear):
            names.append(name)
    return names


def add_flux_lora(transformer: Any, rank: int, alpha: float | None = None, preset: str = "all", *,
                  include_norms: bool = False, adapter_name: str = "default", **lora_kwargs: Any) -> list[str]:
    """Add a fresh LoRA to the transformer (diffusers' PEFT integration); returns its target names.

    The base weights are frozen; only the LoRA parameters require gradients.
    """
    from peft import LoraConfig

    targets = flux_lora_targets(transformer, preset, include_norms=include_norms)
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                        init_lora_weights=lora_kwargs.pop("init_lora_weights", "gaussian"), **lora_kwargs)
    transformer.add_adapter(config, adapter_name=adapter_name)
    return targets


# --- memory shapes --------------------------------------------------------------------------------------


def _meta_transformer(variant: str) -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    with torch.device("meta"):
        if variant == "chroma":
            return ChromaTransformer2DModel()  # the class defaults are Chroma1's real config
        # The class defaults are FLUX.1's real config (19 double, 38 single blocks, width 3072).
        return FluxTransformer2DModel(guidance_embeds=variant in ("flux-dev", "flux-kontext"))


def lora_param_count(transformer: torch.nn.Module, rank: int, preset: str = "all", *,
                     include_norms: bool = False) -> int:
    """Parameters of a rank-`rank` LoRA on the preset's targets: rank * (in + out) per Linear."""
    modules = dict(transformer.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features)
               for n in flux_lora_targets(transformer, preset, include_norms=include_norms))


def flux_param_counts(variant: str = "flux-dev", rank: int = 16, preset: str = "all", *,
                      include_norms: bool = False) -> dict[str, int]:
    """Real-size parameter counts from the model built on the meta device (no memory, no weights).

    Keys: total, per_double_block, per_single_block, double_blocks, single_blocks, other, lora.
    """
    model = _meta_transformer(variant)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    doubles, singles = model.transformer_blocks, model.single_transformer_blocks
    total = count(model)
    return {"total": total, "per_double_block": count(doubles[0]), "per_single_block": count(singles[0]),
            "double_blocks": len(doubles), "single_blocks": len(singles),
            "other": total - count(doubles) - count(singles),
            "lora": lora_param_count(model, rank, preset, include_norms=include_norms)}
