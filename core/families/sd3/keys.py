"""Stable Diffusion 3 / 3.5 names: diffusers' SD3Transformer2DModel <-> SAI's MMDiT (ComfyUI, sd-scripts).

SAI's MMDiT (what sd3.5_medium.safetensors holds under `model.diffusion_model.`, what ComfyUI runs and
what sd-scripts trains) fuses what diffusers keeps apart, rows stacked in this order:
  joint_blocks.N.x_block.attn.qkv        = attn.to_q | attn.to_k | attn.to_v                    (h, h, h)
  joint_blocks.N.x_block.attn2.qkv       = attn2.to_q | attn2.to_k | attn2.to_v (SD3.5 medium's dual attention)
  joint_blocks.N.context_block.attn.qkv  = attn.add_q_proj | attn.add_k_proj | attn.add_v_proj  (h, h, h)
The last block's context stream is "pre only": qkv and modulation, no output projection, no MLP.
Two modulation Linears list (shift, scale) where diffusers lists (scale, shift): `final_layer.adaLN_modulation.1`
and the last block's `context_block.adaLN_modulation.1` (diffusers' single-file converter swaps them).

This module holds the table of the LoRA-trained modules (used by the LoRA files) and a full-state
converter diffusers -> MMDiT (the tests' ComfyUI layout; loading goes through diffusers' own converter).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from core.families.dit.fused_lora import module_table

# (MMDiT module inside joint_blocks.N, the diffusers modules inside transformer_blocks.N, in row order).
BLOCK_MODULES = module_table("""
    x_block.attn.qkv        = attn.to_q attn.to_k attn.to_v
    x_block.attn.proj       = attn.to_out.0
    x_block.attn2.qkv       = attn2.to_q attn2.to_k attn2.to_v
    x_block.attn2.proj      = attn2.to_out.0
    x_block.mlp.fc1         = ff.net.0.proj
    x_block.mlp.fc2         = ff.net.2
    context_block.attn.qkv  = attn.add_q_proj attn.add_k_proj attn.add_v_proj
    context_block.attn.proj = attn.to_add_out
    context_block.mlp.fc1   = ff_context.net.0.proj
    context_block.mlp.fc2   = ff_context.net.2
""")
# Parameters that are renamed one to one (weights and biases alike), inside a block.
_BLOCK_PARAMS = {
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_TOP_PARAMS = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# Tensor names (no prefix) that only an MMDiT file has; model_info / detection look for them.
SINGLE_FILE_MARKERS = ("joint_blocks.0.context_block.attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.weight")
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along the rows: MMDiT's (shift, scale) <-> diffusers' (scale, shift)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MMDiT tensors of a file without their `model.diffusion_model.` prefix (other parts dropped)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def is_mmdit_keys(keys) -> bool:
    names = {k for k in keys}
    return any(k.endswith(m) for k in names for m in SINGLE_FILE_MARKERS)


def diffusers_to_mmdit(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A full SD3Transformer2DModel state dict -> SAI MMDiT names (the inverse of diffusers' converter)."""
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    last = blocks[-1] if blocks else -1
    out: dict[str, torch.Tensor] = {}
    fused_parts = {p: (native, parts) for native, parts in BLOCK_MODULES for p in parts}
    done: set[str] = set()
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        m = re.match(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            block, module, end = int(m[1]), m[2], m[3]
            if module in fused_parts:
                native, parts = fused_parts[module]
                target = f"joint_blocks.{block}.{native}.{end}"
                if target not in done:
                    out[target] = torch.cat([state[f"transformer_blocks.{block}.{p}.{end}"] for p in parts], 0)
                    done.add(target)
                continue
            native = _BLOCK_PARAMS.get(module)
            if native is None:
                raise KeyError(f"No MMDiT name for '{key}'.")
            swap = module == "norm1_context.linear" and block == last
            out[f"joint_blocks.{block}.{native}.{end}"] = swap_halves(value) if swap else value
            continue
        module, _, end = key.rpartition(".")
        if module not in _TOP_PARAMS:
            raise KeyError(f"No MMDiT name for '{key}'.")
        out[f"{_TOP_PARAMS[module]}.{end}"] = swap_halves(value) if module == "norm_out.linear" else value
    return {prefix + k: v for k, v in out.items()}


def lora_module_for(path: str) -> tuple[str, tuple[str, ...], int]:
    """(MMDiT module, its diffusers parts, index of `path` among them) of a trained diffusers module."""
    m = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", path)
    if m:
        for native, parts in BLOCK_MODULES:
            if m[2] in parts:
                return (f"joint_blocks.{m[1]}.{native}", tuple(f"transformer_blocks.{m[1]}.{p}" for p in parts),
                        parts.index(m[2]))
    raise ValueError(f"'{path}' is not an SD3 block attention / MLP module with an MMDiT name "
                     "(modulation, embedders and the final layer are not written).")


def lora_module_from_native(native: str) -> tuple[str, tuple[str, ...]]:
    """(MMDiT module, diffusers parts) of an MMDiT module name (`joint_blocks.3.x_block.attn.qkv`)."""
    m = re.match(r"^joint_blocks\.(\d+)\.(.+)$", native)
    if m:
        for name, parts in BLOCK_MODULES:
            if name == m[2]:
                return native, tuple(f"transformer_blocks.{m[1]}.{p}" for p in parts)
    raise ValueError(f"'{native}' is not an SD3 block attention / MLP module.")


def native_from_kohya(name: str) -> str:
    """`lora_unet_joint_blocks_0_x_block_attn_qkv` -> `joint_blocks.0.x_block.attn.qkv`."""
    m = re.match(r"^lora_unet_joint_blocks_(\d+)_(.+)$", name)
    if m:
        for native, _ in BLOCK_MODULES:
            if native.replace(".", "_") == m[2]:
                return f"joint_blocks.{m[1]}.{native}"
    raise ValueError(f"'{name}' is not an SD3 MMDiT block module in kohya names (lora_unet_joint_blocks_N_...).")
