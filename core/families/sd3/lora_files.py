"""SD3 / SD3.5 LoRA files: diffusers/PEFT module names <-> sd-scripts' MMDiT kohya names.

Which file goes where (ComfyUI comfy/lora.py `model_lora_keys_unet`, read from its source):
- For every `diffusion_model.<name>.weight` of the loaded MMDiT, ComfyUI accepts `lora_unet_<name with _>`:
  that is what sd-scripts' SD3 LoRA writes (`lora_unet_joint_blocks_0_x_block_attn_qkv`), one module per
  MMDiT Linear, qkv fused. WebUI Forge reads the same names. This is our `<name>.safetensors`.
- For SD3 models ComfyUI also maps diffusers names (`transformer.transformer_blocks.0.attn.to_q`, sliced into
  the fused qkv by comfy.utils.mmdit_to_diffusers): so the diffusers file loads there too.
- diffusers reads its own `pytorch_lora_weights.safetensors` (SD3LoraLoaderMixin has no kohya converter).

Fusing is exact (core.families.dit.fused_lora): down = [A_q; A_k; A_v] (rank 3r),
up = blockdiag(B_q, B_k, B_v), alpha * 3, so alpha / rank and every row of dW are unchanged.
"""
from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from core.export.kohya import LoraFormatError
from core.export.metadata import MODELSPEC_VERSION
from core.families.dit.fused_lora import NativeModule, fused_kohya_tensors, split_kohya_modules
from core.families.dit.lora_files import (diffusers_writer, group_plain_lora, kohya_file_writer, KohyaLayout,
                                          read_family_lora)
from core.families.sd3.keys import lora_module_for, lora_module_from_native, native_from_kohya

UNET_PREFIX = "lora_unet_"
# sd-scripts: ss_base_model_version is the MMDiT's model_type (library/sd3_utils analyze_state_dict_state),
# modelspec.architecture "stable-diffusion-3-" + model_type; implementation "diffusers" for an SD3 LoRA.
MODEL_TYPES = ("medium", "5-medium", "5-large")  # SD3 medium, SD3.5 medium, SD3.5 large
_IDENTITY_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")


def group_sd3_peft(peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    return group_plain_lora(peft_state, "SD3")


def _module_for(path: str) -> tuple[NativeModule, int]:
    try:
        native, members, index = lora_module_for(path)
    except ValueError as exc:
        raise LoraFormatError(str(exc)) from exc
    return NativeModule(native, members), index


def peft_to_kohya(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                  use_rslora: bool = False) -> dict[str, Tensor]:
    """An SD3 transformer PEFT state -> kohya tensors under MMDiT names, qkv fused."""
    return fused_kohya_tensors(group_sd3_peft(peft_state), _module_for, alpha=alpha, use_rslora=use_rslora)


def _native_groups(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{MMDiT module: {lora_down.weight, lora_up.weight, alpha}} of a kohya or ComfyUI-style file."""
    grouped: dict[str, dict[str, Tensor]] = {}
    names = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    for key, value in tensors.items():
        if key.startswith(("lora_te", "text_encoder")):
            continue  # text encoder LoRAs: not trained here, left out
        for part in ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha"):
            if key.endswith("." + part):
                module = key[: -len(part) - 1]
                break
        else:
            raise LoraFormatError(f"'{key}' is not a LoRA key (lora_down / lora_up / alpha); LoHa, LoKr and DoRA "
                                  "files are not converted here.")
        try:
            if module.startswith(UNET_PREFIX):
                native = native_from_kohya(module)
            else:
                native = module.removeprefix("diffusion_model.")
                lora_module_from_native(native)
        except ValueError as exc:
            raise LoraFormatError(str(exc)) from exc
        grouped.setdefault(native, {})[names.get(part, part)] = value
    return grouped


def kohya_to_peft(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """kohya (`lora_unet_joint_blocks_...`) or `diffusion_model.joint_blocks...` tensors -> (PEFT state, alphas)."""
    return split_kohya_modules(_native_groups(tensors), lambda native: NativeModule(*lora_module_from_native(native)))


def kohya_metadata(model_type: str, *, rank: int, alpha: float, started_at: float | None = None,
                   resolution: int = 1024) -> dict[str, str]:
    """The keys that say what the file is, as sd-scripts' SD3 LoRA writes them."""
    if model_type not in MODEL_TYPES:
        raise LoraFormatError(f"Unknown SD3 model type '{model_type}'; expected one of {', '.join(MODEL_TYPES)}.")
    started = datetime.datetime.now().timestamp() if started_at is None else started_at
    alpha = float(alpha)
    return {
        "ss_base_model_version": model_type,
        "ss_v2": "False",
        "ss_network_module": "networks.lora_sd3",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(int(alpha)) if alpha.is_integer() else repr(alpha),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"stable-diffusion-3-{model_type}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"LoRA@{int(started)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.implementation_version": "lora-scripts",
    }


_KOHYA = KohyaLayout(group_sd3_peft, peft_to_kohya, kohya_metadata, _IDENTITY_KEYS)


write_kohya_file = kohya_file_writer(_KOHYA, "model_type")  # sd-scripts' SD3 names
write_diffusers_file = diffusers_writer("StableDiffusion3Pipeline", group_sd3_peft)


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """Any SD3 LoRA file (kohya, ComfyUI `diffusion_model.`, diffusers) -> (PEFT state, {module: alpha}, metadata)."""
    return read_family_lora(path, label="SD3 transformer", from_native=kohya_to_peft, group=group_sd3_peft,
                            diffusers_prefixes=("transformer.", "base_model.model."))


# --- the LoRA tools' hook (inspect, convert, resize, merge): kohya MMDiT names, qkv kept fused ---------

def _model_type_for(variant: str, metadata: Mapping[str, str]) -> str:
    """The file's own sd-scripts model type when it names one (SD3 medium), else the registry row's."""
    named = metadata.get("ss_base_model_version", "")
    if named in MODEL_TYPES and (variant != "sd35-large") == (named != "5-large"):
        return named
    return "5-large" if variant == "sd35-large" else "5-medium"


def lora_file_format() -> Any:
    """What the LoRA tools need: sd-scripts' MMDiT-named kohya modules (core.families.dit.tools_format)."""
    from core.families.dit.tools_format import kohya_tools_format

    def identity(variant: str, metadata: Mapping[str, str], rank: int, alpha: float) -> dict[str, str]:
        return kohya_metadata(_model_type_for(variant, metadata), rank=rank, alpha=alpha)

    return kohya_tools_format(family="SD3", read_lora=read_lora, peft_to_kohya=peft_to_kohya,
                              kohya_to_peft=kohya_to_peft, identity=identity, identity_keys=_IDENTITY_KEYS,
                              write_diffusers_file=write_diffusers_file)
