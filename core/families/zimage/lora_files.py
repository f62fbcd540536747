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


from core.export.kohya import LoraFormatError
from core.families.dit.fused_lora import NativeModule, NativeNames, module_table
from core.families.dit.lora_files import kohya_identity, kohya_lora_files

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


_NAMES = NativeNames("Z-Image", native_module_for, native_module_from_kohya)
group_peft, peft_to_kohya, kohya_to_peft = _NAMES.group, _NAMES.to_kohya, _NAMES.to_peft


def kohya_metadata(variant: str, *, rank: int, alpha: float) -> dict[str, str]:
    """The identity keys of a Z-Image kohya LoRA (family, network, rank/alpha, modelspec)."""
    return kohya_identity(base_model_version=BASE_MODEL_VERSION[variant], network_module="networks.lora",
                          architecture=ARCHITECTURE, implementation=IMPLEMENTATION, rank=rank, alpha=alpha)


# native kohya names (ComfyUI / WebUI), diffusers' file, any form read back, the LoRA tools' hook
write_kohya_file, write_diffusers_file, read_lora, lora_file_format = kohya_lora_files(
    _NAMES, kohya_metadata, pipeline="ZImagePipeline", variants=BASE_MODEL_VERSION, default_variant="z-image-turbo")
