"""The pieces every transformer family's LoRA files share.

Each family module keeps what is its own (native module names, fused modules, its metadata
strings); the grouping of a PEFT state by module, the alpha lookup and diffusers'
`pytorch_lora_weights.safetensors` (keys `transformer.<module>.lora_A/B.weight`, the LoraConfig
in `lora_adapter_metadata`) are the same for all of them and live here.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.atomic import atomic_path
from core.export.diffusers_format import DIFFUSERS_WEIGHT_NAME
from core.export.kohya import LoraFormatError, group_peft_state_dict

# The keys of a kohya file that name the model, the network and its rank / alpha (never the caller's).
IDENTITY_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                 "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation")


def strip_prefixes(key: str) -> str:
    """A PEFT key without diffusers' `transformer.` or PEFT's `base_model.model.` prefix."""
    for prefix in ("base_model.model.", "transformer."):
        key = key.removeprefix(prefix)
    return key


def group_plain_lora(peft_state: Mapping[str, Tensor], family: str) -> dict[str, dict[str, Tensor]]:
    """{module path: {"A", "B"}} of a transformer's PEFT state dict, prefixes removed; a DoRA module is
    refused (`family` names the files in the message: only plain LoRA files are written)."""
    modules = group_peft_state_dict({strip_prefixes(k): v for k, v in peft_state.items()})
    for path, parts in modules.items():
        if "magnitude" in parts:
            raise LoraFormatError(f"'{path}' is a DoRA module; {family} files are written for plain LoRA only.")
    return modules


def alpha_of(alpha: float | Mapping[str, float], path: str) -> float:
    """The alpha of module `path`: one value for all, or per module (with or without `transformer.`)."""
    if not isinstance(alpha, Mapping):
        return float(alpha)
    for key in (path, f"transformer.{path}"):
        if key in alpha:
            return float(alpha[key])
    raise LoraFormatError(f"No alpha given for LoRA module '{path}'.")


def most_common(values: list[float]) -> float:
    return Counter(values).most_common(1)[0][0]


def config_dict(lora_config: Any) -> dict[str, Any]:
    """What diffusers stores as `lora_adapter_metadata`: a LoraConfig (or its dict) with r and lora_alpha."""
    from core.export.diffusers_format import _config_metadata

    meta = _config_metadata(lora_config)
    if not meta or "r" not in meta or "lora_alpha" not in meta:
        raise LoraFormatError("The LoraConfig (or its dict) must give at least r and lora_alpha.")
    return meta


def write_diffusers_lora(pipeline_class: Any, modules: Mapping[str, Mapping[str, Tensor]], output_dir: str | Path,
                         *, lora_config: Any, dtype: torch.dtype | None = None) -> Path:
    """`output_dir/pytorch_lora_weights.safetensors` the way `pipeline_class.save_lora_weights` writes it.

    `modules`: {module path: {"A", "B"}} (the family's grouping). The LoraConfig goes into
    `lora_adapter_metadata`, so diffusers loads the LoRA with its real alpha instead of alpha = rank.
    `dtype` casts the floating tensors; None keeps each one's own.
    """
    layers: dict[str, Tensor] = {}
    for module_path, parts in modules.items():
        for part, name in (("A", "lora_A"), ("B", "lora_B")):
            value = parts[part].detach().to("cpu")
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            layers[f"{module_path}.{name}.weight"] = value.contiguous()
    if not layers:
        raise LoraFormatError(f"Nothing to save in {output_dir}: the LoRA has no tensors.")
    target = Path(output_dir) / DIFFUSERS_WEIGHT_NAME
    with atomic_path(target) as tmp:
        # diffusers writes <save_directory>/<weight_name>: point it at the temporary name.
        pipeline_class.save_lora_weights(save_directory=str(tmp.parent), weight_name=tmp.name,
                                         transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=config_dict(lora_config),
                                         safe_serialization=True)
    return target


def file_rank_and_alpha(modules: Mapping[str, Mapping[str, Tensor]], alpha: float | Mapping[str, float],
                        use_rslora: bool = False) -> tuple[int, float]:
    """The most common rank and alpha of the modules, what a kohya file's ss_network_dim / _alpha say
    (rsLoRA's alpha / sqrt(r) written as alpha' / r)."""
    rank = int(most_common([parts["A"].shape[0] for parts in modules.values()]))
    alphas = [alpha_of(alpha, p) * (math.sqrt(parts["A"].shape[0]) if use_rslora else 1.0)
              for p, parts in modules.items()]
    return rank, most_common(alphas)


def save_with_identity(path: str | Path, tensors: dict[str, Tensor], base: Mapping[str, str],
                       metadata: Mapping[str, Any] | None, identity_keys: tuple[str, ...],
                       dtype: torch.dtype | None) -> Path:
    """The kohya file, atomically with sshs hashes: the caller's metadata over the family's `base` keys, except
    the `identity_keys` (family, network, rank / alpha), which always come from `base`."""
    from core.export.kohya import save_kohya_lora

    # A `lora_adapter_metadata` header would make diffusers treat the file as its own format.
    caller = {k: v for k, v in (metadata or {}).items() if k != "lora_adapter_metadata"}
    return save_kohya_lora(path, tensors, {**base, **caller, **{k: base[k] for k in identity_keys}}, dtype=dtype)


def read_diffusers_modules(tensors: Mapping[str, Tensor], metadata: Mapping[str, str],
                           group: Callable[[Mapping[str, Tensor]], dict[str, dict[str, Tensor]]]
                           ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """(PEFT state, {module: alpha}) of diffusers' file: alphas from its `lora_adapter_metadata` LoraConfig,
    alpha = rank without one (as diffusers assumes)."""
    from core.export.inspect import _config_alpha

    config: dict[str, Any] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()
                  if k.startswith("transformer.")}
    peft: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    for module_path, parts in group(tensors).items():
        peft[f"{module_path}.lora_A.weight"] = parts["A"]
        peft[f"{module_path}.lora_B.weight"] = parts["B"]
        alphas[module_path] = _config_alpha(config or None, module_path, int(parts["A"].shape[0]))[0]
    return peft, alphas


def kohya_identity(*, base_model_version: str, network_module: str, architecture: str, implementation: str,
                   rank: int, alpha: float) -> dict[str, str]:
    """A kohya file's identity keys (`IDENTITY_KEYS`: family, network, rank / alpha, modelspec) with a title
    and date of now (the caller's metadata may override those two)."""
    import datetime

    from core.export.metadata import MODELSPEC_VERSION, num_text

    now = datetime.datetime.now().timestamp()
    return {
        "ss_base_model_version": base_model_version,
        "ss_v2": "False",
        "ss_network_module": network_module,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": num_text(alpha),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": f"LoRA@{int(now)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
        "modelspec.implementation_version": "lora-scripts",
    }


def folded_rank_and_alpha(modules: Mapping[str, Mapping[str, Tensor]], alpha: float | Mapping[str, float],
                          use_rslora: bool = False) -> tuple[int, float]:
    """A file whose scale is folded into lora_B: its largest rank, and alpha = rank (scale 1 for a loader)."""
    rank = int(max(parts["A"].shape[0] for parts in modules.values()))
    return rank, rank


@dataclass(frozen=True)
class KohyaLayout:
    """How a family writes its WebUI / ComfyUI file: its grouping of a PEFT state by module, its native
    names, its metadata keys, and which of them name the model (they are never the caller's)."""

    group: Callable[[Mapping[str, Tensor]], dict[str, dict[str, Tensor]]]
    to_kohya: Callable[..., dict[str, Tensor]]        # (PEFT state, *, alpha, use_rslora) -> kohya tensors
    metadata: Callable[..., dict[str, str]]            # (model name, *, rank, alpha) -> the family's keys
    identity_keys: tuple[str, ...]
    check: Callable[[list[str], str], None] | None = None   # (module paths, model name) -> refuse a misfit
    # (modules, alpha, use_rslora) -> the rank and alpha the metadata states.
    rank_and_alpha: Callable[..., tuple[int, float]] = file_rank_and_alpha


def kohya_file_writer(layout: KohyaLayout, model_arg: str = "variant") -> Callable[..., Path]:
    """A family's `write_kohya_file(peft_state, path, *, <model_arg>, alpha, metadata, use_rslora, dtype)`."""

    def write_kohya_file(peft_state: Mapping[str, Tensor], path: str | Path, **kwargs: Any) -> Path:
        return write_kohya_lora(layout, peft_state, path, kwargs.pop(model_arg), **kwargs)

    write_kohya_file.__doc__ = write_kohya_lora.__doc__
    return write_kohya_file


def write_kohya_lora(layout: KohyaLayout, peft_state: Mapping[str, Tensor], path: str | Path, model: str, *,
                     alpha: float | Mapping[str, float], metadata: Mapping[str, Any] | None = None,
                     use_rslora: bool = False, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """The family's kohya file for `model` (its variant or type), atomically with sshs hashes.

    `metadata` adds or overrides descriptive keys (`ss_output_name`, `modelspec.title`, ...); the keys
    naming the family, network and rank/alpha always come from the layout. `dtype=None` keeps each
    tensor's dtype.
    """
    modules = layout.group(peft_state)
    if not modules:
        raise LoraFormatError(f"Nothing to save in {path}: the LoRA has no tensors.")
    if layout.check is not None:
        layout.check(list(modules), model)
    tensors = layout.to_kohya(peft_state, alpha=alpha, use_rslora=use_rslora)
    rank, file_alpha = layout.rank_and_alpha(modules, alpha, use_rslora)
    return save_with_identity(path, tensors, layout.metadata(model, rank=rank, alpha=file_alpha), metadata,
                              layout.identity_keys, dtype)


def diffusers_writer(pipeline: str, group: Callable[[Mapping[str, Tensor]], dict[str, dict[str, Tensor]]]
                     ) -> Callable[..., Path]:
    """A family's diffusers-file writer: `(PEFT state, folder, *, lora_config, dtype=None)` ->
    `folder/pytorch_lora_weights.safetensors` as diffusers' `pipeline.save_lora_weights` writes it."""

    def write_diffusers_file(peft_state: Mapping[str, Tensor], output_dir: str | Path, *, lora_config: Any,
                             dtype: torch.dtype | None = None) -> Path:
        import diffusers

        return write_diffusers_lora(getattr(diffusers, pipeline), group(peft_state), output_dir,
                                    lora_config=lora_config, dtype=dtype)

    write_diffusers_file.__doc__ = f"`output_dir/pytorch_lora_weights.safetensors` as {pipeline}.save_lora_weights writes it."
    return write_diffusers_file


def has_native_keys(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bool:
    """A kohya / ComfyUI file (`lora_unet_...`, `diffusion_model....`), not diffusers' own."""
    return any(k.startswith(("lora_unet_", "diffusion_model.")) for k in tensors)


def read_family_lora(path: str | Path, *, label: str,
                     from_native: Callable[[Mapping[str, Tensor]], tuple[dict[str, Tensor], dict[str, float]]],
                     group: Callable[[Mapping[str, Tensor]], dict[str, dict[str, Tensor]]],
                     is_native: Callable[[Mapping[str, Tensor], Mapping[str, str]], bool] = has_native_keys,
                     diffusers_prefixes: tuple[str, ...] = ("transformer.",),
                     check_module: Callable[[str], Any] | None = None
                     ) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """Any form of a family's LoRA file -> (PEFT state, {module: alpha}, metadata): its native names through
    `from_native`, diffusers' file (the keys under `diffusers_prefixes`) through `group`; `check_module`
    raises for a module path the family has no native name for (a foreign module fails clearly)."""
    from core.export.kohya import load_kohya_lora

    tensors, metadata = load_kohya_lora(path)
    if is_native(tensors, metadata):
        peft, alphas = from_native(tensors)
    else:
        peft, alphas = read_diffusers_modules({k: v for k, v in tensors.items() if k.startswith(diffusers_prefixes)},
                                              metadata, group)
    if not peft:
        raise LoraFormatError(f"{path}: no {label} LoRA tensors found.")
    for module_path in alphas if check_module is not None else ():
        check_module(module_path)
    return peft, alphas, metadata


def kohya_lora_files(names: Any, kohya_metadata: Callable[..., dict[str, str]], *, pipeline: str,
                     variants: Mapping[str, Any], default_variant: str, layout: KohyaLayout | None = None
                     ) -> tuple[Callable[..., Path], Callable[..., Path], Callable[..., Any], Callable[[], Any]]:
    """(write_kohya_file, write_diffusers_file, read_lora, lora_file_format) of a family whose WebUI / ComfyUI
    file holds kohya names of its native modules: `names` (a fused_lora.NativeNames) maps them, diffusers'
    file is `pipeline`'s, the LoRA tools write a variant they do not know (`variants`) as `default_variant`.
    `layout`: another WebUI / ComfyUI file than the kohya-named one."""
    layout = layout or KohyaLayout(names.group, names.to_kohya, kohya_metadata, IDENTITY_KEYS)
    write_diffusers_file = diffusers_writer(pipeline, names.group)

    def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
        """Any form of the family's LoRA file (kohya, ComfyUI, diffusers) -> (PEFT state, {module: alpha}, metadata)."""
        return read_family_lora(path, label=names.family, from_native=names.to_peft, group=names.group,
                                check_module=names.module_for)

    def lora_file_format() -> Any:
        """What the LoRA tools need: kohya names of the family's native modules (core.families.dit.tools_format)."""
        from core.families.dit.tools_format import kohya_tools_format, variant_identity

        return kohya_tools_format(family=names.family, read_lora=read_lora, peft_to_kohya=names.to_kohya,
                                  kohya_to_peft=names.to_peft, write_diffusers_file=write_diffusers_file,
                                  identity=variant_identity(kohya_metadata, variants, default_variant))

    return kohya_file_writer(layout), write_diffusers_file, read_lora, lora_file_format
