"""FLUX.1 / Chroma transformer weights: Black Forest Labs (ComfyUI / WebUI) names <-> diffusers.

diffusers' own converters (`convert_flux_transformer_checkpoint_to_diffusers`, and the
Chroma one) hard-code the FLUX.1 width (3072), so they cannot read a narrower model;
this one takes the width from the weights, and goes both ways (tests write tiny BFL
files with `diffusers_to_bfl`). Chroma is FLUX without the per-block modulation Linears
and the final adaLN, plus its `distilled_guidance_layer`. The test suite checks that
`bfl_to_diffusers` gives exactly what diffusers' converters give on real widths.
"""
from __future__ import annotations

import torch

# Prefixes that ComfyUI / sd-scripts checkpoints put in front of the BFL names.
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# Top-level modules: BFL name -> diffusers name (both followed by .weight/.bias).
_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
# Inside double_blocks.N / transformer_blocks.N: whole tensors renamed.
_DOUBLE = {
    "img_mod.lin.weight": "norm1.linear.weight", "img_mod.lin.bias": "norm1.linear.bias",
    "txt_mod.lin.weight": "norm1_context.linear.weight", "txt_mod.lin.bias": "norm1_context.linear.bias",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0.weight": "ff.net.0.proj.weight", "img_mlp.0.bias": "ff.net.0.proj.bias",
    "img_mlp.2.weight": "ff.net.2.weight", "img_mlp.2.bias": "ff.net.2.bias",
    "txt_mlp.0.weight": "ff_context.net.0.proj.weight", "txt_mlp.0.bias": "ff_context.net.0.proj.bias",
    "txt_mlp.2.weight": "ff_context.net.2.weight", "txt_mlp.2.bias": "ff_context.net.2.bias",
    "img_attn.proj.weight": "attn.to_out.0.weight", "img_attn.proj.bias": "attn.to_out.0.bias",
    "txt_attn.proj.weight": "attn.to_add_out.weight", "txt_attn.proj.bias": "attn.to_add_out.bias",
}
# Fused q/k/v in BFL, three Linears in diffusers.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {
    "modulation.lin.weight": "norm.linear.weight", "modulation.lin.bias": "norm.linear.bias",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2.weight": "proj_out.weight", "linear2.bias": "proj_out.bias",
}
# linear1 = q, k, v and the MLP input projection stacked along the output rows.
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def strip_prefix(keys_or_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without ComfyUI's `model.diffusion_model.` (or `diffusion_model.`) prefix."""
    out = {}
    for key, value in keys_or_state.items():
        for prefix in BFL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


# Chroma's approximator (distilled_guidance_layer.layers.N.<x> / .norms.N.<x>): BFL -> diffusers part names.
_APPROXIMATOR = {"in_layer": "linear_1", "out_layer": "linear_2", "scale": "weight"}
_MODULATION = ("img_mod.lin", "txt_mod.lin", "modulation.lin")


def _rename_approximator(key: str, names: dict[str, str]) -> str:
    # Only the part after the layer index changes; in_proj / out_proj keep their names.
    parts = key.split(".")
    if len(parts) >= 4 and parts[1] in ("layers", "norms"):
        parts[3] = names.get(parts[3], parts[3])
    return ".".join(parts)


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    # BFL's final adaLN gives (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift).
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_indices(keys: list[str], prefix: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith(prefix)})


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL-named FLUX.1 transformer state dict to diffusers' FluxTransformer2DModel names."""
    src = strip_prefix(state)
    inner = src["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return src[key]

    for bfl, diff in _TOP.items():
        for kind in ("weight", "bias"):
            if f"{bfl}.{kind}" in src:
                out[f"{diff}.{kind}"] = take(f"{bfl}.{kind}")
    for kind in ("weight", "bias"):
        if f"final_layer.adaLN_modulation.1.{kind}" in src:  # FLUX only; Chroma has no final adaLN
            out[f"norm_out.linear.{kind}"] = _swap_halves(take(f"final_layer.adaLN_modulation.1.{kind}"))
    for key in src:
        if key.startswith("distilled_guidance_layer."):
            out[_rename_approximator(key, _APPROXIMATOR)] = take(key)
    keys = list(src)
    for i in _block_indices(keys, "double_blocks."):
        for bfl, diff in _DOUBLE.items():
            if bfl.startswith(_MODULATION) and f"double_blocks.{i}.{bfl}" not in src:
                continue  # Chroma: the modulation comes from the approximator, not per block
            out[f"transformer_blocks.{i}.{diff}"] = take(f"double_blocks.{i}.{bfl}")
        for bfl, names in _DOUBLE_FUSED.items():
            for kind in ("weight", "bias"):
                for name, part in zip(names, take(f"double_blocks.{i}.{bfl}.{kind}").chunk(3, dim=0), strict=True):
                    out[f"transformer_blocks.{i}.{name}.{kind}"] = part
    for i in _block_indices(keys, "single_blocks."):
        for bfl, diff in _SINGLE.items():
            if bfl.startswith(_MODULATION) and f"single_blocks.{i}.{bfl}" not in src:
                continue
            out[f"single_transformer_blocks.{i}.{diff}"] = take(f"single_blocks.{i}.{bfl}")
        for kind in ("weight", "bias"):
            fused = take(f"single_blocks.{i}.linear1.{kind}")
            sizes = (inner, inner, inner, fused.shape[0] - 3 * inner)
            for name, part in zip(_SINGLE_FUSED, torch.split(fused, sizes, dim=0), strict=True):
                out[f"single_transformer_blocks.{i}.{name}.{kind}"] = part
    left = sorted(set(src) - used)
    if left:
        raise KeyError(f"{len(left)} tensors of the FLUX file have no diffusers name, e.g. {left[:3]}")
    return out


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `bfl_to_diffusers` (BFL names, optionally with ComfyUI's prefix)."""
    out: dict[str, torch.Tensor] = {}
    for bfl, diff in _TOP.items():
        for kind in ("weight", "bias"):
            if f"{diff}.{kind}" in state:
                out[f"{bfl}.{kind}"] = state[f"{diff}.{kind}"]
    for kind in ("weight", "bias"):
        if f"norm_out.linear.{kind}" in state:
            out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    for key, value in state.items():
        if key.startswith("distilled_guidance_layer."):
            out[_rename_approximator(key, {v: k for k, v in _APPROXIMATOR.items()})] = value
    keys = list(state)
    for i in _block_indices(keys, "transformer_blocks."):
        for bfl, diff in _DOUBLE.items():
            if f"transformer_blocks.{i}.{diff}" not in state and bfl.startswith(_MODULATION):
                continue
            out[f"double_blocks.{i}.{bfl}"] = state[f"transformer_blocks.{i}.{diff}"]
        for bfl, names in _DOUBLE_FUSED.items():
            for kind in ("weight", "bias"):
                out[f"double_blocks.{i}.{bfl}.{kind}"] = torch.cat(
                    [state[f"transformer_blocks.{i}.{n}.{kind}"] for n in names], dim=0)
    for i in _block_indices(keys, "single_transformer_blocks."):
        for bfl, diff in _SINGLE.items():
            if f"single_transformer_blocks.{i}.{diff}" not in state and bfl.startswith(_MODULATION):
                continue
            out[f"single_blocks.{i}.{bfl}"] = state[f"single_transformer_blocks.{i}.{diff}"]
        for kind in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{kind}"] = torch.cat(
                [state[f"single_transformer_blocks.{i}.{n}.{kind}"] for n in _SINGLE_FUSED], dim=0)
    return {prefix + k: v.contiguous() for k, v in out.items()}
