"""Wan LoRA files: diffusers/PEFT module names <-> Wan's native names (ComfyUI, the original code, musubi-tuner).

Who reads what (read from ComfyUI's comfy/lora.py and diffusers 0.42):
- ComfyUI runs Wan with the original module names (comfy/ldm/wan/model.py: `blocks.N.self_attn.q/k/v/o`,
  `cross_attn.q/k/v/o` (+ `k_img/v_img` for I2V), `ffn.0`, `ffn.2`). It has no diffusers-to-Wan map:
  `model_lora_keys_unet` maps every weight `diffusion_model.<native>.weight` as `diffusion_model.<native>`
  and as `lora_unet_<native with _>`; anything else is "lora key not loaded".
- diffusers' `WanPipeline.lora_state_dict` converts `diffusion_model.` files
  (`_convert_non_diffusers_wan_lora_to_diffusers`, alpha folded into the weights) and `lora_unet_` files
  (`_convert_musubi_wan_lora_to_diffusers`, which expects every attention and FFN module of every block).

Our `<name>.safetensors` is the native form with the prefix ComfyUI and diffusion-pipe use:
`diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `.lora_up.weight`, `.alpha`. We read that,
diffusion-pipe's `diffusion_model.<native>.lora_A/B`, musubi-tuner's `lora_unet_blocks_0_self_attn_q` and
diffusers' `transformer.blocks.0.attn1.to_q.lora_A/B`. The LoRA tools hold modules under kohya names
(`lora_unet_<native with _>`) and write them back in the `diffusion_model.` form.
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
from core.families.dit.lora_files import (KohyaLayout, diffusers_writer, group_plain_lora, kohya_file_writer,
                                          read_family_lora)

UNET_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
# (native module in a block, its diffusers module)
BLOCK: tuple[tuple[str, str], ...] = (
    *((f"self_attn.{n}", f"attn1.{d}") for n, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    *((f"cross_attn.{n}", f"attn2.{d}") for n, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                                                      ("k_img", "add_k_proj"), ("v_img", "add_v_proj"))),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
)
_TO_NATIVE = {d: n for n, d in BLOCK}
_FROM_KOHYA = {n.replace(".", "_"): (n, d) for n, d in BLOCK}
_DIFFUSERS_PATH = re.compile(r"^blocks\.(?P<n>\d+)\.(?P<rest>.+)$")
_KOHYA_NAME = re.compile(r"^lora_unet_blocks_(?P<n>\d+)_(?P<rest>.+)$")
_KOHYA_TENSOR = re.compile(r"^(lora_unet_\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
BASE_MODEL_VERSION = {"wan2.1-t2v-1.3b": "wan2.1_t2v_1.3b", "wan2.1-t2v-14b": "wan2.1_t2v_14b",
                      "wan2.2-t2v-a14b": "wan2.2_t2v_a14b", "wan2.1-i2v-14b": "wan2.1_i2v_14b",
                      "wan2.2-i2v-a14b": "wan2.2_i2v_a14b"}
IMPLEMENTATION = "https://github.com/Wan-Video/Wan2.1"
_IDENTITY_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")


def native_module_for(path: str) -> tuple[NativeModule, int]:
    """(native module, 0) of a diffusers module path (Wan has no fused modules)."""
    m = _DIFFUSERS_PATH.match(path)
    if m and m["rest"] in _TO_NATIVE:
        return NativeModule(f"blocks.{m['n']}.{_TO_NATIVE[m['rest']]}", (path,)), 0
    raise LoraFormatError(f"'{path}' is not a Wan block module with a native name (attn1 / attn2 q, k, v, out, "
                          "ffn of blocks.N).")


def native_module_from_kohya(name: str) -> NativeModule:
    m = _KOHYA_NAME.match(name)
    if m and m["rest"] in _FROM_KOHYA:
        native, diffusers = _FROM_KOHYA[m["rest"]]
        return NativeModule(f"blocks.{m['n']}.{native}", (f"blocks.{m['n']}.{diffusers}",))
    raise LoraFormatError(f"'{name}' is not a Wan module name (blocks.N.self_attn / cross_attn / ffn).")


def group_peft(peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    return group_plain_lora(peft_state, "Wan")


def peft_to_kohya(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                  use_rslora: bool = False) -> dict[str, Tensor]:
    """A Wan transformer PEFT state -> kohya tensors of the native modules (`lora_unet_blocks_0_self_attn_q`)."""
    return fused_kohya_tensors(group_peft(peft_state), native_module_for, alpha=alpha, use_rslora=use_rslora)


def kohya_to_comfy(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`lora_unet_blocks_0_self_attn_q.lora_down.weight` -> `diffusion_model.blocks.0.self_attn.q.lora_down.weight`."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        m = _KOHYA_TENSOR.match(key)
        if not m:
            raise LoraFormatError(f"'{key}' is not a kohya LoRA key.")
        out[f"{COMFY_PREFIX}{native_module_from_kohya(m[1]).native}.{m[2]}"] = value
    return out


def kohya_to_peft(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """kohya / ComfyUI / diffusion-pipe Wan tensors -> (PEFT state without prefix, {module path: alpha})."""
    return split_kohya_modules(kohya_key_groups(tensors), native_module_from_kohya)


def kohya_metadata(variant: str, *, rank: int, alpha: float) -> dict[str, str]:
    """The identity keys of a Wan LoRA (family, network, rank/alpha, modelspec)."""
    import datetime

    from core.family_api.registry import family_info

    variant = variant if variant in BASE_MODEL_VERSION else "wan2.1-t2v-1.3b"
    now = datetime.datetime.now().timestamp()
    return {
        "ss_base_model_version": BASE_MODEL_VERSION.get(variant, BASE_MODEL_VERSION["wan2.1-t2v-1.3b"]),
        "ss_v2": "False",
        "ss_network_module": "networks.lora_wan",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": num_text(alpha),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{family_info(variant).modelspec_architecture}/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": f"LoRA@{int(now)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
        "modelspec.implementation_version": "lora-scripts",
    }


def _comfy_tensors(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                   use_rslora: bool = False) -> dict[str, Tensor]:
    return kohya_to_comfy(peft_to_kohya(peft_state, alpha=alpha, use_rslora=use_rslora))


def _without_diffs(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    # A Wan file may carry norm / bias diffs (diff, diff_b) beside the LoRA: the LoRA modules are what train.
    return kohya_to_peft({k: v for k, v in tensors.items() if not k.endswith((".diff", ".diff_b"))})


# The ComfyUI file (`diffusion_model.<native>` names with alpha, sshs hashes) and diffusers' file.
write_kohya_file = kohya_file_writer(KohyaLayout(group_peft, _comfy_tensors, kohya_metadata, _IDENTITY_KEYS))
write_diffusers_file = diffusers_writer("WanPipeline", group_peft)


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """Any Wan LoRA file (ours / ComfyUI, diffusion-pipe, musubi-tuner, diffusers) -> (PEFT, alphas, metadata)."""
    peft, alphas, metadata = read_family_lora(path, label="Wan", from_native=_without_diffs, group=group_peft)
    for module_path in alphas:
        native_module_for(module_path)  # a foreign module fails here, clearly
    return peft, alphas, metadata


# --- the LoRA tools' hook (core.family_api.contract.LoraFileFormat) -------------------------------------------

def lora_file_format() -> Any:
    """What the LoRA tools need: kohya names of Wan's native modules, written back in the `diffusion_model.` form."""
    import dataclasses

    from core.export.kohya import save_kohya_lora
    from core.families.dit.tools_format import kohya_tools_format, modules_to_peft, rank_and_alpha, tool_metadata
    from core.tools.modules import modules_to_kohya

    def identity(variant: str, metadata: Mapping[str, str], rank: int, alpha: float) -> dict[str, str]:
        return kohya_metadata(variant, rank=rank, alpha=alpha)

    base = kohya_tools_format(family="Wan", read_lora=read_lora, peft_to_kohya=peft_to_kohya,
                              kohya_to_peft=kohya_to_peft, identity=identity, identity_keys=_IDENTITY_KEYS,
                              write_diffusers_file=write_diffusers_file)

    def write_kohya(modules: dict[str, Any], path: str | Path, *, variant: str, metadata: dict[str, str],
                    dtype: torch.dtype | None) -> Path:
        peft, alphas = modules_to_peft(modules, "Wan", kohya_to_peft)
        rank, alpha = rank_and_alpha(peft, alphas)
        merged = tool_metadata(identity(variant, metadata, rank, alpha), metadata, _IDENTITY_KEYS)
        return save_kohya_lora(path, kohya_to_comfy(modules_to_kohya(modules)), merged, dtype=dtype)

    return dataclasses.replace(base, write_kohya=write_kohya)
