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


from core.export.kohya import LoraFormatError
from core.families.dit.fused_lora import NativeModule, NativeNames
from core.families.dit.lora_files import kohya_identity, kohya_lora_files

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


_NAMES = NativeNames("FLUX.2", native_module_for, native_module_from_kohya)
group_peft, peft_to_kohya, kohya_to_peft = _NAMES.group, _NAMES.to_kohya, _NAMES.to_peft


def kohya_metadata(variant: str, *, rank: int, alpha: float) -> dict[str, str]:
    """The identity keys of a FLUX.2 kohya LoRA (family, network, rank/alpha, modelspec)."""
    return kohya_identity(base_model_version=BASE_MODEL_VERSION[variant], network_module="networks.lora_flux",
                          architecture=ARCHITECTURE[variant], implementation=IMPLEMENTATION, rank=rank, alpha=alpha)


# native kohya names (ComfyUI / WebUI), diffusers' file, any form read back, the LoRA tools' hook
write_kohya_file, write_diffusers_file, read_lora, lora_file_format = kohya_lora_files(
    _NAMES, kohya_metadata, pipeline="Flux2KleinPipeline", variants=BASE_MODEL_VERSION, default_variant="flux2-klein-4b")
