"""FLUX.2 LoRA files: diffusers/PEFT module names <-> BFL (ComfyUI) kohya names.

Who reads what (ComfyUI's comfy/lora.py + diffusers 0.42's lora_conversion_utils):
- ComfyUI runs FLUX.2 with BFL's module names (`double_blocks.N.img_attn.qkv` fused, `img_attn.proj`,
  `img_mlp.0` / `img_mlp.2`, the `txt_` twins, `single_blocks.N.linear1` / `linear2`); its generic
  `model_lora_keys_unet` loop maps `lora_unet_<name with _>` and `diffusion_model.<name>` onto every weight.
- diffusers' `Flux2LoraLoaderMixin.lora_state_dict` reads kohya keys (`_convert_kohya_flux2_lora_to_diffusers`):
  it splits a fused qkv (exactly, when the up matrix is block-diagonal as ours is), scales by alpha / rank,
  and maps linear1 / linear2 onto the single blocks' fused `to_qkv_mlp_proj` / `to_out` as they are.

Our `<name>.safetensors` therefore holds kohya names of the BFL modules, qkv fused exactly
(core.families.dit.fused_lora: down = [A_q; A_k; A_v], up = blockdiag, alpha * 3); both loaders read every key.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.export.kohya import LoraFormatError
from core.export.metadata import MODELSPEC_VERSION, num_text
from core.families.dit.fused_lora import NativeModule, fused_kohya_tensors, kohya_key_groups, split_kohya_modules
from core.families.dit.lora_files import (file_rank_and_alpha, group_plain_lora, read_diffusers_modules,
                                          save_with_identity, write_diffusers_lora)

UNET_PREFIX = "lora_unet_"
# (BFL module in a block, the diffusers modules it is made of in row order), per block kind.
_DOUBLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.linear_in",)),
    ("img_mlp.2", ("ff.linear_out",)),
    ("txt_mlp.0", ("ff_context.linear_in",)),
    ("txt_mlp.2", ("ff_context.linear_out",)),
)
_SINGLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_qkv_mlp_proj",)),
    ("linear2", ("attn.to_out",)),
)
_SCOPES = {"transformer_blocks": ("double_blocks", _DOUBLE), "single_transformer_blocks": ("single_blocks", _SINGLE)}
_NATIVE_SCOPES = {native: (scope, table) for scope, (native, table) in _SCOPES.items()}
_DIFFUSERS_PATH = re.compile(r"^(?P<scope>transformer_blocks|single_transformer_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")
_KOHYA_NAME = re.compile(r"^lora_unet_(?P<scope>double_blocks|single_blocks)_(?P<n>\d+)_(?P<rest>.+)$")
BASE_MODEL_VERSION = {"flux2-klein-4b": "flux2_klein_4b", "flux2-klein-9b": "flux2_klein_9b", "flux2-dev": "flux2_dev"}
ARCHITECTURE = {"flux2-klein-4b": "flux-2-klein-4b", "flux2-klein-9b": "flux-2-klein-9b", "flux2-dev": "flux-2-dev"}
IMPLEMENTATION = "https://github.com/black-forest-labs/flux2"
_IDENTITY_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")


def native_module_for(path: str) -> tuple[NativeModule, int]:
    """(BFL module, index of `path` among its parts) of a diffusers module path."""
    m = _DIFFUSERS_PATH.match(path)
    if m:
        native_scope, table = _SCOPES[m["scope"]]
        for native, parts in table:
            if m["rest"] in parts:
                return (NativeModule(f"{native_scope}.{m['n']}.{native}",
                                     tuple(f"{m['scope']}.{m['n']}.{p}" for p in parts)), parts.index(m["rest"]))
    raise LoraFormatError(f"'{path}' is not a FLUX.2 block module with a BFL name (the double blocks' attention "
                          "and MLPs, the single blocks' linear1 / linear2).")


def native_module_from_kohya(name: str) -> NativeModule:
    m = _KOHYA_NAME.match(name)
    if m:
        scope, table = _NATIVE_SCOPES[m["scope"]]
        for native, parts in table:
            if m["rest"] == native.replace(".", "_"):
                return NativeModule(f"{m['scope']}.{m['n']}.{native}", tuple(f"{scope}.{m['n']}.{p}" for p in parts))
    raise LoraFormatError(f"'{name}' is not a FLUX.2 kohya module name.")


def group_peft(peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    return group_plain_lora(peft_state, "FLUX.2")


def peft_to_kohya(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                  use_rslora: bool = False) -> dict[str, Tensor]:
    """A FLUX.2 transformer PEFT state -> kohya tensors of the BFL modules (qkv fused)."""
    return fused_kohya_tensors(group_peft(peft_state), native_module_for, alpha=alpha, use_rslora=use_rslora)


def kohya_to_peft(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """kohya / ComfyUI FLUX.2 tensors -> (PEFT state without prefix, {module path: alpha}); qkv split exactly."""
    return split_kohya_modules(kohya_key_groups(tensors), native_module_from_kohya)


def kohya_metadata(variant: str, *, rank: int, alpha: float) -> dict[str, str]:
    """The identity keys of a FLUX.2 kohya LoRA (family, network, rank/alpha, modelspec)."""
    import datetime

    now = datetime.datetime.now().timestamp()
    return {
        "ss_base_model_version": BASE_MODEL_VERSION[variant],
        "ss_v2": "False",
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": num_text(alpha),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{ARCHITECTURE[variant]}/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": f"LoRA@{int(now)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
        "modelspec.implementation_version": "lora-scripts",
    }


def write_kohya_file(peft_state: Mapping[str, Tensor], path: str | Path, *, variant: str,
                     alpha: float | Mapping[str, float], metadata: Mapping[str, Any] | None = None,
                     use_rslora: bool = False, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """The ComfyUI / WebUI file (BFL kohya names, sshs hashes), written atomically."""
    modules = group_peft(peft_state)
    tensors = peft_to_kohya(peft_state, alpha=alpha, use_rslora=use_rslora)
    rank, file_alpha = file_rank_and_alpha(modules, alpha, use_rslora)
    return save_with_identity(path, tensors, kohya_metadata(variant, rank=rank, alpha=file_alpha), metadata,
                              _IDENTITY_KEYS, dtype)


def write_diffusers_file(peft_state: Mapping[str, Tensor], output_dir: str | Path, *, lora_config: Any,
                         dtype: torch.dtype | None = None) -> Path:
    """`output_dir/pytorch_lora_weights.safetensors` as `Flux2KleinPipeline.save_lora_weights` writes it."""
    from diffusers import Flux2KleinPipeline

    return write_diffusers_lora(Flux2KleinPipeline, group_peft(peft_state), output_dir, lora_config=lora_config,
                                dtype=dtype)


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """Any FLUX.2 LoRA file (kohya, ComfyUI, diffusers) -> (PEFT state, {module: alpha}, metadata)."""
    from core.export.kohya import load_kohya_lora

    tensors, metadata = load_kohya_lora(path)
    if any(k.startswith((UNET_PREFIX, "diffusion_model.")) for k in tensors):
        peft, alphas = kohya_to_peft(tensors)
        return peft, alphas, metadata
    peft, alphas = read_diffusers_modules({k: v for k, v in tensors.items() if k.startswith("transformer.")},
                                          metadata, group_peft)
    for module_path in alphas:
        native_module_for(module_path)  # a foreign module fails here, clearly
    if not peft:
        raise LoraFormatError(f"{path}: no FLUX.2 LoRA tensors found.")
    return peft, alphas, metadata


def lora_file_format() -> Any:
    """What the LoRA tools need: kohya names of FLUX.2's BFL modules (core.families.dit.tools_format)."""
    from core.families.dit.tools_format import kohya_tools_format

    def identity(variant: str, metadata: Mapping[str, str], rank: int, alpha: float) -> dict[str, str]:
        return kohya_metadata(variant if variant in BASE_MODEL_VERSION else "flux2-klein-4b", rank=rank, alpha=alpha)

    return kohya_tools_format(family="FLUX.2", read_lora=read_lora, peft_to_kohya=peft_to_kohya,
                              kohya_to_peft=kohya_to_peft, identity=identity, identity_keys=_IDENTITY_KEYS,
                              write_diffusers_file=write_diffusers_file)
