"""Z-Image LoRA files: diffusers/PEFT module names <-> native (ComfyUI / original) kohya names.

Who reads what (read from ComfyUI's comfy/lora.py + comfy/utils.py and diffusers 0.42):
- ComfyUI runs Z-Image as its Lumina2 / NextDiT model with the original module names
  (`layers.N.attention.qkv` fused, `attention.out`, `feed_forward.w1/w2/w3`,
  `adaLN_modulation.0`; same inside `noise_refiner.N` / `context_refiner.N`).
  `model_lora_keys_unet` maps, for every weight of the model, `lora_unet_<native name with _>`
  and `diffusion_model.<native name>` onto it; its Lumina2 branch adds the diffusers names
  (`to_q/to_k/to_v` onto row slices of qkv).
- diffusers' `ZImagePipeline.lora_state_dict` converts `lora_unet_` keys
  (`_convert_non_diffusers_z_image_lora_to_diffusers`): it splits a fused `attention.qkv`
  LoRA into to_q/to_k/to_v (each gets the whole down and its third of up) and maps
  `attention.out` to `attention.to_out.0`. The `diffusion_model.<native>` form is NOT split
  there (qkv would stay an unknown module), so:

Our `<name>.safetensors` uses kohya names of the native modules, fused qkv kept fused
(`lora_unet_layers_0_attention_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`): ComfyUI
loads it key for key through its generic `lora_unet_` map, diffusers reads every key, and it
is the layout of kohya-style trainers for Z-Image (musubi-tuner). The fusion is the exact
one of core.families.dit.fused_lora: down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v), alpha * 3.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from core.export.kohya import LoraFormatError
from core.export.metadata import MODELSPEC_VERSION
from core.export.metadata import num_text
from core.families.dit.fused_lora import (NativeModule, fused_kohya_tensors, kohya_key_groups, module_table,
                                          split_kohya_modules)
from core.families.dit.lora_files import (diffusers_writer, group_plain_lora, kohya_file_writer, KohyaLayout,
                                          read_family_lora)

UNET_PREFIX = "lora_unet_"
SCOPES = ("layers", "noise_refiner", "context_refiner")
# (native module in a block, the diffusers modules it is made of in row order)
_BLOCK = module_table("""
    attention.qkv      = attention.to_q attention.to_k attention.to_v
    attention.out      = attention.to_out.0
    feed_forward.w1    = feed_forward.w1
    feed_forward.w2    = feed_forward.w2
    feed_forward.w3    = feed_forward.w3
    adaLN_modulation.0 = adaLN_modulation.0
""")
_DIFFUSERS_PATH = re.compile(r"^(?P<scope>layers|noise_refiner|context_refiner)\.(?P<n>\d+)\.(?P<rest>.+)$")
_KOHYA_NAME = re.compile(r"^lora_unet_(?P<scope>layers|noise_refiner|context_refiner)_(?P<n>\d+)_(?P<rest>.+)$")
# kohya/WebUI labels (kohya-style trainers: musubi-tuner's sai_model_spec "Z-Image").
BASE_MODEL_VERSION = {"z-image-turbo": "z_image_turbo", "z-image": "z_image"}
ARCHITECTURE = "Z-Image"
IMPLEMENTATION = "https://github.com/Tongyi-MAI/Z-Image"
_IDENTITY_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")


def native_module_for(path: str) -> tuple[NativeModule, int]:
    """(native module, index of `path` among its parts) of a diffusers module path."""
    m = _DIFFUSERS_PATH.match(path)
    if m:
        for native, parts in _BLOCK:
            if m["rest"] in parts:
                prefix = f"{m['scope']}.{m['n']}."
                return NativeModule(prefix + native, tuple(prefix + p for p in parts)), parts.index(m["rest"])
    raise LoraFormatError(f"'{path}' is not a Z-Image block module with a native name (attention, feed_forward, "
                          "adaLN_modulation of layers / noise_refiner / context_refiner).")


def native_module_from_kohya(name: str) -> NativeModule:
    m = _KOHYA_NAME.match(name)
    if m:
        for native, parts in _BLOCK:
            if m["rest"] == native.replace(".", "_"):
                prefix = f"{m['scope']}.{m['n']}."
                return NativeModule(prefix + native, tuple(prefix + p for p in parts))
    raise LoraFormatError(f"'{name}' is not a Z-Image kohya module name.")


def group_peft(peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    return group_plain_lora(peft_state, "Z-Image")


def peft_to_kohya(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                  use_rslora: bool = False) -> dict[str, Tensor]:
    """A Z-Image transformer PEFT state -> kohya tensors of the native modules (qkv fused)."""
    return fused_kohya_tensors(group_peft(peft_state), native_module_for, alpha=alpha, use_rslora=use_rslora)


def kohya_to_peft(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """kohya / ComfyUI Z-Image tensors -> (PEFT state without prefix, {module path: alpha}); qkv split exactly."""
    return split_kohya_modules(kohya_key_groups(tensors), native_module_from_kohya)


def kohya_metadata(variant: str, *, rank: int, alpha: float) -> dict[str, str]:
    """The identity keys of a Z-Image kohya LoRA (family, network, rank/alpha, modelspec)."""
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


_KOHYA = KohyaLayout(group_peft, peft_to_kohya, kohya_metadata, _IDENTITY_KEYS)


write_kohya_file = kohya_file_writer(_KOHYA)  # native kohya names (ComfyUI / WebUI)
write_diffusers_file = diffusers_writer("ZImagePipeline", group_peft)


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """Any Z-Image LoRA file (kohya, ComfyUI, diffusers) -> (PEFT state, {module: alpha}, metadata)."""
    peft, alphas, metadata = read_family_lora(path, label="Z-Image", from_native=kohya_to_peft, group=group_peft)
    for module_path in alphas:
        native_module_for(module_path)  # a foreign module fails here, clearly
    return peft, alphas, metadata


# --- the LoRA tools' hook (core.family_api.contract.LoraFileFormat) -------------------------------------------


def lora_file_format() -> Any:
    """What the LoRA tools need: kohya names of Z-Image's native modules (core.families.dit.tools_format)."""
    from core.families.dit.tools_format import kohya_tools_format

    def identity(variant: str, metadata: Mapping[str, str], rank: int, alpha: float) -> dict[str, str]:
        return kohya_metadata(variant if variant in BASE_MODEL_VERSION else "z-image-turbo", rank=rank, alpha=alpha)

    return kohya_tools_format(family="Z-Image", read_lora=read_lora, peft_to_kohya=peft_to_kohya,
                              kohya_to_peft=kohya_to_peft, identity=identity, identity_keys=_IDENTITY_KEYS,
                              write_diffusers_file=write_diffusers_file)
