"""diffusers' own LoRA file, `pytorch_lora_weights.safetensors`, with its alpha kept.

Written by the pipeline class's `save_lora_weights`, so `pipe.load_lora_weights(dir)` reads
it back. The LoraConfig of each component goes into the file's `lora_adapter_metadata`
(`unet_lora_adapter_metadata=` / `text_encoder_lora_adapter_metadata=`): without it a loader
assumes alpha = rank and a LoRA trained with alpha != rank loads at the wrong strength.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.atomic import atomic_path
from core.family_api.registry import UNET_FAMILIES, family_info
from core.export.kohya import LoraFormatError, canonical_text_encoder_path, group_peft_state_dict

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _pipeline_class(family: str):
    """The diffusers pipeline whose `save_lora_weights` writes this family's file."""
    import diffusers

    if family not in UNET_FAMILIES:
        raise LoraFormatError(f"Unknown model family '{family}' ({', '.join(UNET_FAMILIES)}).")
    return getattr(diffusers, family_info(family).pipeline_class)


def _config_metadata(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    meta = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # JSON-safe: sets become lists (diffusers does that only at the top level).
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}


# diffusers' naming of the two LoRA matrices, for every module (not only the attention
# projections its `convert_state_dict_to_diffusers` renames). Its loader converts a state
# dict back to PEFT names only when the FIRST key is not already in PEFT form, so a mix
# (conv layers left as `lora_A`, attention as `lora.down`) loads without the attention part.
_UNET_NAMES = ((".lora_A.", ".lora.down."), (".lora_B.", ".lora.up."))
_TEXT_NAMES = ((".lora_A.", ".lora_linear_layer.down."), (".lora_B.", ".lora_linear_layer.up."))


def _prepare(state: dict[str, Tensor], dtype: torch.dtype | None, *, text_encoder: bool) -> dict[str, Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers

    group_peft_state_dict(state)  # validates the keys with a clear message
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")  # a PeftModel's prefix
        if text_encoder:
            # transformers 5 drops CLIPTextModel's `text_model` wrapper; files keep the usual names.
            key = canonical_text_encoder_path(key)
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    converted = convert_state_dict_to_diffusers(out)
    renames = _TEXT_NAMES if text_encoder else _UNET_NAMES
    uniform: dict[str, Tensor] = {}
    for key, value in converted.items():
        for old, new in renames:
            key = key.replace(old, new)
        if text_encoder and key.endswith(".lora_magnitude_vector"):
            # diffusers (0.42, with transformers 5) loads a text encoder's DoRA magnitude only
            # under a `.weight` name; without it the text encoder silently loses its DoRA part.
            key += ".weight"
        uniform[key] = value
    return uniform


def save_diffusers_lora(output_dir: str | Path, family: str, unet_lora: dict[str, Tensor],
                        text_encoder_loras: list[dict[str, Tensor]], *, unet_lora_config: Any,
                        text_encoder_lora_configs: list[Any] | None = None,
                        dtype: torch.dtype | None = None) -> Path:
    """Write `output_dir/pytorch_lora_weights.safetensors` atomically; returns its path.

    `unet_lora` / `text_encoder_loras` are PEFT state dicts (`get_peft_model_state_dict`);
    the configs are the components' LoraConfigs (`model.peft_config["default"]`).
    """
    pipeline_cls = _pipeline_class(family)
    te_names = list(family_info(family).text_encoders)
    if len(text_encoder_loras) > len(te_names):
        raise LoraFormatError(f"{family} has {len(te_names)} text encoder(s); got {len(text_encoder_loras)} LoRA dicts.")
    te_configs = list(text_encoder_lora_configs or [])
    if any(sd for sd in text_encoder_loras) and len(te_configs) < sum(1 for sd in text_encoder_loras if sd):
        raise LoraFormatError("Pass a LoraConfig for each trained text encoder (text_encoder_lora_configs), "
                              "so its alpha is stored in the file.")
    kwargs: dict[str, Any] = {}
    if unet_lora:
        kwargs["unet_lora_layers"] = _prepare(unet_lora, dtype, text_encoder=False)
        kwargs["unet_lora_adapter_metadata"] = _config_metadata(unet_lora_config)
    for index, state in enumerate(text_encoder_loras):
        if not state:
            continue
        name = te_names[index]
        kwargs[f"{name}_lora_layers"] = _prepare(state, dtype, text_encoder=True)
        kwargs[f"{name}_lora_adapter_metadata"] = _config_metadata(te_configs[index] if index < len(te_configs)
                                                                   else None)
    if not any(key.endswith("_lora_layers") for key in kwargs):
        raise LoraFormatError(f"Nothing to save in {output_dir}: the LoRA has no tensors.")
    target = Path(output_dir) / DIFFUSERS_WEIGHT_NAME
    with atomic_path(target) as tmp:
        # diffusers writes <save_directory>/<weight_name>: point it at the temporary name.
        pipeline_cls.save_lora_weights(save_directory=str(tmp.parent), weight_name=tmp.name,
                                       safe_serialization=True, **kwargs)
    return target


_TO_PEFT = ((".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."), (".lora_linear_layer.down.", ".lora_A."),
            (".lora_linear_layer.up.", ".lora_B."), (".lora_down.", ".lora_A."), (".lora_up.", ".lora_B."))


def diffusers_lora_to_peft(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
                           ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]], dict[str, float]]:
    """A diffusers LoRA state dict -> (UNet PEFT dict, [text_encoder, text_encoder_2 PEFT dicts], alphas).

    Alphas (keyed `unet.<path>` / `text_encoder.<path>` ..., as `kohya_to_peft` returns them) come from
    the file's adapter metadata; without it a module's alpha is its rank, as diffusers assumes.
    Text encoder paths keep `text_model.`; `core.export.kohya.fit_keys_to_model` adapts them.
    """
    import json
    import math

    from core.export.inspect import _pattern_value

    components = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in components:
            raise LoraFormatError(f"'{key}' is not a diffusers LoRA key (expected unet./text_encoder./text_encoder_2.).")
        rest = f".{rest}"
        for old, new in _TO_PEFT:
            rest = rest.replace(old, new)
        if rest.endswith(".lora_magnitude_vector.weight"):  # the text encoder's DoRA name on disk
            rest = rest.removesuffix(".weight")
        components[component][rest[1:]] = value
    configs: dict[str, dict] = {}
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        for key, value in json.loads(raw).items():
            component, _, name = key.partition(".")
            configs.setdefault(component, {})[name] = value
    alphas: dict[str, float] = {}
    for component, state in components.items():
        config = configs.get(component, {})
        for path, parts in group_peft_state_dict(state).items():
            rank = int(parts["A"].shape[0])
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank)))
            if config.get("use_rslora"):
                alpha *= math.sqrt(rank)
            alphas[f"{component}.{path}"] = alpha
    return components["unet"], [components["text_encoder"], components["text_encoder_2"]], alphas
