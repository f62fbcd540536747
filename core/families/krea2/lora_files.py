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
from core.families.dit.fused_lora import NativeModule, NativeNames
from core.families.dit.lora_files import (IDENTITY_KEYS, KohyaLayout, alpha_of, folded_rank_and_alpha, kohya_identity,
                                          kohya_lora_files)

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


_NAMES = NativeNames("Krea 2", native_module_for, native_module_from_kohya)
group_peft, peft_to_kohya, kohya_to_peft = _NAMES.group, _NAMES.to_kohya, _NAMES.to_peft


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
    return kohya_identity(base_model_version=BASE_MODEL_VERSION[variant], network_module="networks.lora",
                          architecture=ARCHITECTURE, implementation=IMPLEMENTATION, rank=rank, alpha=alpha)


# The ComfyUI / diffusers-readable native file (scale folded, so its alpha is its largest rank), diffusers' file,
# any form read back, and the LoRA tools' hook (kohya names of the native modules; see `lora_file_format`).
write_native_file, write_diffusers_file, read_lora, kohya_file_format = kohya_lora_files(
    _NAMES, kohya_metadata, pipeline="Krea2Pipeline", variants=BASE_MODEL_VERSION, default_variant="krea2",
    layout=KohyaLayout(group_peft, native_tensors, kohya_metadata, IDENTITY_KEYS, rank_and_alpha=folded_rank_and_alpha))


def lora_file_format() -> Any:
    """The LoRA tools' hook; their WebUI / ComfyUI output is the native file both loaders read."""
    import dataclasses

    from core.families.dit.tools_format import modules_to_peft, tool_metadata, variant_identity

    identity = variant_identity(kohya_metadata, BASE_MODEL_VERSION, "krea2")
    base = kohya_file_format()

    def write_kohya(modules: dict[str, Any], path: str | Path, *, variant: str, metadata: dict[str, str],
                    dtype: torch.dtype | None) -> Path:
        from core.export.kohya import save_kohya_lora

        peft, alphas = modules_to_peft(modules, "Krea 2", kohya_to_peft)
        rank = int(max(v.shape[0] for k, v in peft.items() if k.endswith("lora_A.weight")))
        merged = tool_metadata(identity(variant, metadata, rank, rank), metadata, IDENTITY_KEYS)
        return save_kohya_lora(path, native_tensors(peft, alpha=alphas), merged, dtype=dtype)

    return dataclasses.replace(base, write_kohya=write_kohya)
