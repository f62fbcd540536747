"""Krea 2 LoRA files: diffusers/PEFT module names <-> krea-ai's native names (what ComfyUI has).

Who reads what (diffusers 0.42's lora_conversion_utils, ComfyUI's comfy/lora.py):
- ComfyUI runs Krea 2 with the native module names (`blocks.N.attn.wq/wk/wv/gate/wo`, `blocks.N.mlp.gate/up/down`,
  `txtfusion.<layerwise|refiner>_blocks.N...`); its generic map applies `diffusion_model.<name>` (and
  `lora_unet_<name with _>`) to every weight, with lora_A/lora_B or lora_down/lora_up, `.alpha` optional.
- diffusers' `Krea2Pipeline.lora_state_dict` reads `diffusion_model.<native>.lora_A/lora_B.weight` (the Krea 2
  reference trainer's and ai-toolkit's form) and maps it onto `Krea2Transformer2DModel`; it reads no kohya
  `lora_unet_` names and no `.alpha` keys (a file with them fails to load).

So our `<name>.safetensors` holds `diffusion_model.<native>.lora_A/lora_B.weight` with each module's scale
(alpha / rank, or / sqrt(rank) for rsLoRA) folded into lora_B and no alpha key: both loaders read every key and
apply exactly the trained dW (a loader without an alpha uses alpha = rank, scale 1). Beside it, diffusers'
`pytorch_lora_weights.safetensors`. The LoRA tools hold these modules under kohya names of the native modules.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.export.kohya import LoraFormatError
from core.export.metadata import MODELSPEC_VERSION, num_text
from core.families.dit.fused_lora import NativeModule, fused_kohya_tensors, kohya_key_groups, split_kohya_modules
from core.families.dit.lora_files import (alpha_of, group_plain_lora, read_diffusers_modules, save_with_identity,
                                          write_diffusers_lora)

COMFY_PREFIX = "diffusion_model."
# diffusers sub-module of a block -> its native name
_INNER = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv", "attn.to_gate": "attn.gate",
          "attn.to_out.0": "attn.wo", "ff.gate": "mlp.gate", "ff.up": "mlp.up", "ff.down": "mlp.down"}
_NATIVE_INNER = {v: k for k, v in _INNER.items()}
_DIFFUSERS_PATH = re.compile(r"^(?:transformer_blocks\.(?P<n>\d+)|text_fusion\.(?P<stack>layerwise_blocks|refiner_blocks)"
                             r"\.(?P<m>\d+))\.(?P<rest>.+)$")
_NATIVE_PATH = re.compile(r"^(?:blocks\.(?P<n>\d+)|txtfusion\.(?P<stack>layerwise_blocks|refiner_blocks)\.(?P<m>\d+))"
                          r"\.(?P<rest>.+)$")
_KOHYA_NAME = re.compile(r"^lora_unet_(?:blocks_(?P<n>\d+)|txtfusion_(?P<stack>layerwise_blocks|refiner_blocks)_(?P<m>\d+))"
                         r"_(?P<rest>attn_(?:wq|wk|wv|gate|wo)|mlp_(?:gate|up|down))$")
BASE_MODEL_VERSION = {"krea2": "krea2", "krea2-turbo": "krea2"}  # one kind of LoRA: trained on Raw, used on Turbo
ARCHITECTURE = "Krea-2"
IMPLEMENTATION = "https://github.com/krea-ai/krea-2"
_IDENTITY_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")


def native_name(path: str) -> str:
    """A diffusers module path -> its native (ComfyUI) name."""
    m = _DIFFUSERS_PATH.match(path)
    if m and m["rest"] in _INNER:
        scope = f"blocks.{m['n']}" if m["n"] is not None else f"txtfusion.{m['stack']}.{m['m']}"
        return f"{scope}.{_INNER[m['rest']]}"
    raise LoraFormatError(f"'{path}' is not a Krea 2 block module with a native name (attention wq/wk/wv/gate/wo, "
                          "mlp gate/up/down of the blocks and the txtfusion blocks).")


def diffusers_path(native: str) -> str:
    m = _NATIVE_PATH.match(native)
    if m and m["rest"] in _NATIVE_INNER:
        scope = f"transformer_blocks.{m['n']}" if m["n"] is not None else f"text_fusion.{m['stack']}.{m['m']}"
        return f"{scope}.{_NATIVE_INNER[m['rest']]}"
    raise LoraFormatError(f"'{native}' is not a Krea 2 native module name.")


def native_module_for(path: str) -> tuple[NativeModule, int]:
    return NativeModule(native_name(path), (path,)), 0


def native_module_from_kohya(name: str) -> NativeModule:
    m = _KOHYA_NAME.match(name)
    if not m:
        raise LoraFormatError(f"'{name}' is not a Krea 2 kohya module name.")
    scope = f"blocks.{m['n']}" if m["n"] is not None else f"txtfusion.{m['stack']}.{m['m']}"
    kind, sub = m["rest"].split("_", 1)
    native = f"{scope}.{kind}.{sub}"
    return NativeModule(native, (diffusers_path(native),))


def group_peft(peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    return group_plain_lora(peft_state, "Krea 2")


def peft_to_kohya(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                  use_rslora: bool = False) -> dict[str, Tensor]:
    """A Krea 2 PEFT state -> kohya tensors of the native modules (the LoRA tools' form)."""
    return fused_kohya_tensors(group_peft(peft_state), native_module_for, alpha=alpha, use_rslora=use_rslora)


def kohya_to_peft(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    return split_kohya_modules(kohya_key_groups(tensors), native_module_from_kohya)


def native_tensors(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                   use_rslora: bool = False) -> dict[str, Tensor]:
    """`diffusion_model.<native>.lora_A/lora_B.weight`, the scale folded into lora_B (no alpha key)."""
    out: dict[str, Tensor] = {}
    for path, parts in group_peft(peft_state).items():
        rank = parts["A"].shape[0]
        scale = alpha_of(alpha, path) / (math.sqrt(rank) if use_rslora else rank)
        name = COMFY_PREFIX + native_name(path)
        out[f"{name}.lora_A.weight"] = parts["A"].detach().float().cpu().contiguous()
        out[f"{name}.lora_B.weight"] = (parts["B"].detach().float().cpu() * scale).contiguous()
    return out


def kohya_metadata(variant: str, *, rank: int, alpha: float) -> dict[str, str]:
    import datetime

    now = datetime.datetime.now().timestamp()
    return {
        "ss_base_model_version": BASE_MODEL_VERSION[variant],
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": num_text(alpha),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{ARCHITECTURE}/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": f"LoRA@{int(now)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
        "modelspec.implementation_version": "lora-scripts",
    }


def write_native_file(peft_state: Mapping[str, Tensor], path: str | Path, *, variant: str,
                      alpha: float | Mapping[str, float], metadata: Mapping[str, Any] | None = None,
                      use_rslora: bool = False, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """The ComfyUI / diffusers-readable native file (scale folded, so its alpha is its rank), written atomically."""
    modules = group_peft(peft_state)
    rank = int(max(p["A"].shape[0] for p in modules.values()))
    tensors = native_tensors(peft_state, alpha=alpha, use_rslora=use_rslora)
    return save_with_identity(path, tensors, kohya_metadata(variant, rank=rank, alpha=rank), metadata,
                              _IDENTITY_KEYS, dtype)


def write_diffusers_file(peft_state: Mapping[str, Tensor], output_dir: str | Path, *, lora_config: Any,
                         dtype: torch.dtype | None = None) -> Path:
    from diffusers import Krea2Pipeline

    return write_diffusers_lora(Krea2Pipeline, group_peft(peft_state), output_dir, lora_config=lora_config, dtype=dtype)


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """Any Krea 2 LoRA file (native, kohya, diffusers) -> (PEFT state, {module: alpha}, metadata)."""
    from core.export.kohya import load_kohya_lora

    tensors, metadata = load_kohya_lora(path)
    if any(k.startswith(("lora_unet_", COMFY_PREFIX)) for k in tensors):
        peft, alphas = kohya_to_peft(tensors)
        return peft, alphas, metadata
    peft, alphas = read_diffusers_modules({k: v for k, v in tensors.items() if k.startswith("transformer.")},
                                          metadata, group_peft)
    for module_path in alphas:
        native_name(module_path)
    if not peft:
        raise LoraFormatError(f"{path}: no Krea 2 LoRA tensors found.")
    return peft, alphas, metadata


def lora_file_format() -> Any:
    """The LoRA tools' hook; their WebUI / ComfyUI output is the native file both loaders read."""
    import dataclasses

    from core.families.dit.tools_format import kohya_tools_format, modules_to_peft, tool_metadata

    def identity(variant: str, metadata: Mapping[str, str], rank: int, alpha: float) -> dict[str, str]:
        return kohya_metadata(variant if variant in BASE_MODEL_VERSION else "krea2", rank=rank, alpha=alpha)

    base = kohya_tools_format(family="Krea 2", read_lora=read_lora, peft_to_kohya=peft_to_kohya,
                              kohya_to_peft=kohya_to_peft, identity=identity, identity_keys=_IDENTITY_KEYS,
                              write_diffusers_file=write_diffusers_file)

    def write_kohya(modules: dict[str, Any], path: str | Path, *, variant: str, metadata: dict[str, str],
                    dtype: torch.dtype | None) -> Path:
        from core.export.kohya import save_kohya_lora

        peft, alphas = modules_to_peft(modules, "Krea 2", kohya_to_peft)
        rank = int(max(v.shape[0] for k, v in peft.items() if k.endswith("lora_A.weight")))
        merged = tool_metadata(identity(variant, metadata, rank, rank), metadata, _IDENTITY_KEYS)
        return save_kohya_lora(path, native_tensors(peft, alpha=alphas), merged, dtype=dtype)

    return dataclasses.replace(base, write_kohya=write_kohya)
