"""What is in a LoRA file: format, model family, modules with rank/alpha, metadata, broken tensors.

Reads only with safetensors (and a PEFT folder's adapter_config.json); pickled files are
refused. Family names and labels come from the family table (core.family_api.registry);
a transformer family's own files are recognised by its rows' `lora_key_markers` and read through the
family's `lora_files` (core.family_api.lookup). The base of
`tools/export.py inspect` and of the "this LoRA is for another model" check before a LoRA
is applied.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.family_api.registry import (FALLBACK_FAMILY, FAMILIES, family_label, family_of_context_dim, family_of_metadata,
                                     family_of_text_encoder_width)

FAMILY_NAMES = {**{name: family_label(name) for name in FAMILIES}, "llm": "a language model"}
# lora_te3_ is FLUX's T5 (lora_te1_ its CLIP-L).
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
COMFY_PREFIX = "diffusion_model."
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")

_KOHYA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale|lora_mid\.weight"
                         r"|hada_\w+|lokr_\w+)$")
_ADAPTER_PART = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down"
                           r"|lora_linear_layer\.up|lora_down|lora_up|lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?"
                           r"(?:\.weight)?$")


class LoraReadError(ValueError):
    """A LoRA file that cannot be read; the message names the file and what to do."""


@dataclass
class LoraFileInfo:
    path: Path
    format: str                              # "kohya" | "comfyui" | "diffusers" | "peft"
    family: str                              # a registry family ("sdxl", "flux-dev" ...) | "llm" | "unknown"
    modules: dict[str, tuple[int, float]]    # module -> (rank, alpha), scale = alpha / rank
    metadata: dict[str, str]
    num_tensors: int
    nonfinite: list[str]                     # tensors holding NaN or inf
    has_text_encoder: bool
    has_conv: bool                           # LoCon: LoRA on 3x3 (or larger) convolutions
    has_dora: bool
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted({rank for rank, _ in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({alpha for _, alpha in self.modules.values()})


def _resolve_file(path: Path) -> tuple[Path, Path | None]:
    """The .safetensors to read, and a PEFT adapter_config.json beside it (if any)."""
    if path.is_dir():
        for name in ADAPTER_FILES:
            if (path / name).is_file():
                config = path / "adapter_config.json"
                return path / name, config if config.is_file() else None
        raise LoraReadError(f"{path} holds no LoRA file ({' or '.join(ADAPTER_FILES)}).")
    if not path.is_file():
        raise LoraReadError(f"{path} does not exist.")
    if path.suffix.lower() != ".safetensors":
        raise LoraReadError(f"{path}: only .safetensors LoRA files are read; .ckpt/.pt/.bin files are pickles "
                            "that can run code. Convert it to .safetensors first.")
    config = path.parent / "adapter_config.json"
    return path, config if path.name == "adapter_model.safetensors" and config.is_file() else None


def _transformer_family_from_metadata(metadata: dict[str, str]) -> str | None:
    """A transformer family (FLUX.1, Chroma, ...) from modelspec.architecture (names the variant), else
    ss_base_model_version (flux1 is dev or schnell: the first family of the table with it, FLUX.1-dev)."""
    arch = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    version = metadata.get("ss_base_model_version", "")
    transformers = [info for info in FAMILIES.values() if info.kind != "unet"]
    return next((i.name for i in transformers if arch == i.modelspec_architecture), None) or \
        next((i.name for i in transformers if version == i.ss_base_model_version), None)


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """The family WebUI would see (ss_base_model_version / ss_v2), else from modelspec.architecture."""
    family = _transformer_family_from_metadata(metadata) or family_of_metadata(metadata)
    if family:
        return family
    if metadata.get("ss_v2") == "False" and metadata.get("ss_network_module") \
            and not metadata.get("modelspec.architecture"):
        # Older sd-scripts files without ss_base_model_version (and without modelspec); a file naming an
        # architecture the table does not list (SD3 medium's "stable-diffusion-3-medium") goes on to its keys.
        return FALLBACK_FAMILY
    return None


def _family_from_key_markers(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The family whose `lora_key_markers` the keys match most (a variant row lists its family's markers
    plus its own, so it wins over the family's first row); ties go to the first row of the table. A row with
    `lora_shape_markers` counts only when a key has its shape, and then wins over the rows without."""
    keys = list(shapes)
    best, best_score = None, 0
    # The transformer rows first: a tie (FLUX's CLIP-L is lora_te1_, as SDXL's) goes to the transformer.
    for info in sorted(FAMILIES.values(), key=lambda i: i.kind == "unet"):
        score = sum(any(re.search(m, k) for k in keys) for m in info.lora_key_markers)
        if info.lora_shape_markers:
            shaped = sum(any(re.search(m, k) and tuple(shapes[k])[:1] == (dim,) for k in keys)
                         for m, dim in info.lora_shape_markers)
            score = score + shaped if shaped and score else 0
        if score > best_score:
            best, best_score = info.name, score
    return best


def family_from_keys(shapes: dict[str, tuple[int, ...]], fmt: str, adapter_config: dict | None) -> str:
    """A registry family, "llm" or "unknown" from the key names and the widths of the LoRA tensors."""
    keys = list(shapes)
    own = _family_from_key_markers(shapes)
    if own:
        return own
    if fmt == "peft":
        task = str((adapter_config or {}).get("task_type") or "")
        if task.startswith("CAUSAL_LM") or any(".layers." in k and ("self_attn" in k or "mlp" in k) for k in keys):
            return "llm"
    for key, shape in shapes.items():
        # attn2.to_k reads the text context: its input width tells the family.
        if "attn2" in key and "to_k" in key and ("lora_down" in key or "lora_A" in key or "lora.down" in key):
            if len(shape) >= 2 and (family := family_of_context_dim(shape[1])):
                return family
    for key, shape in shapes.items():
        if key.startswith(("lora_te_", "text_encoder.")) and ("down" in key or "lora_A" in key) and len(shape) == 2:
            if "fc2" not in key and (family := family_of_text_encoder_width(shape[1])):
                return family
    return "unknown"


def _detect_format(keys: list[str], metadata: dict[str, str], adapter_config: dict | None) -> str:
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if keys and all(k.startswith((COMFY_PREFIX, *KOHYA_PREFIXES)) for k in keys):
        return "comfyui"
    if adapter_config is not None or any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if "lora_adapter_metadata" in metadata or any(k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in keys):
        return "diffusers"
    if any(_ADAPTER_PART.match(k) for k in keys):
        return "peft"
    raise LoraReadError("no LoRA weights recognised (expected kohya lora_unet_/lora_te_ keys, ComfyUI "
                        "diffusion_model. keys, diffusers unet./transformer./text_encoder. keys, or PEFT "
                        "lora_A/lora_B keys)")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _config_alpha(config: dict | None, module: str, rank: int) -> tuple[float, bool]:
    """Alpha (as alpha/rank would need it) of `module` under a LoraConfig dict; bool: config known."""
    if not config:
        return float(rank), False
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)
    return alpha, True


def _diffusers_configs(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        configs.setdefault(component, {})[field_name] = value
    return configs


def inspect_lora(path: str | Path) -> LoraFileInfo:
    """Read a LoRA file (or a diffusers/PEFT folder) and describe it."""
    from safetensors import SafetensorError, safe_open

    file, config_path = _resolve_file(Path(path))
    adapter_config = None
    if config_path is not None:
        try:
            adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LoraReadError(f"{config_path}: not valid JSON ({exc}).") from exc
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraReadError(f"{file}: not a readable .safetensors file ({exc}). It may be truncated; "
                            "save or download it again.") from exc
    keys = list(tensors)
    if adapter_config is None and metadata.get("adapter_config"):
        # A single-file PEFT adapter (core.tools.convert.peft_to_single_file) keeps its config in the header.
        try:
            adapter_config = json.loads(metadata["adapter_config"])
        except json.JSONDecodeError:
            adapter_config = None
    try:
        fmt = _detect_format(keys, metadata, adapter_config)
    except LoraReadError as exc:
        raise LoraReadError(f"{file}: {exc}") from exc
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    family = family_from_metadata(metadata) or family_from_keys(shapes, fmt, adapter_config)
    nonfinite = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    info = LoraFileInfo(path=file, format=fmt, family=family, modules={}, metadata=metadata,
                        num_tensors=len(tensors), nonfinite=nonfinite, has_text_encoder=False, has_conv=False,
                        has_dora=any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys))
    if lora_files_of(family) is not None and fmt in ("kohya", "comfyui", "diffusers"):
        _transformer_modules(info, file, tensors)
    elif fmt == "kohya":
        _kohya_modules(info, tensors)
    else:
        _adapter_modules(info, tensors, fmt, adapter_config)
    if nonfinite:
        info.notes.append(f"{len(nonfinite)} tensor(s) hold NaN/inf: the LoRA is broken (training diverged); "
                          "use an earlier checkpoint.")
    return info


def _kohya_modules(info: LoraFileInfo, tensors: dict[str, torch.Tensor]) -> None:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others: set[str] = set()
    for key, value in tensors.items():
        m = _KOHYA_PART.match(key)
        if not m:
            others.add(key)
            continue
        parts.setdefault(m["module"], {})[m["part"]] = value
    missing_alpha = 0
    for module, p in sorted(parts.items()):
        down = p.get("lora_down.weight")
        if down is None:
            others.update(f"{module}.{name}" for name in p)
            continue
        rank = int(down.shape[0])
        if "alpha" in p:
            alpha = float(p["alpha"].float().item())
        else:
            alpha, missing_alpha = float(rank), missing_alpha + 1
        info.modules[module] = (rank, alpha)
        info.has_text_encoder |= module.startswith(KOHYA_PREFIXES[1:])
        info.has_conv |= down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    if missing_alpha:
        info.notes.append(f"{missing_alpha} module(s) have no alpha: alpha = rank (scale 1).")
    if others:
        info.notes.append(f"{len(others)} tensor(s) are not plain LoRA (LoHa/LoKr/Tucker...), e.g. {sorted(others)[0]}.")
    for module in info.modules:
        scale = tensors.get(f"{module}.dora_scale")
        up = tensors.get(f"{module}.lora_up.weight")
        if scale is None or up is None:
            continue
        if scale.shape[0] != up.shape[0]:
            info.notes.append("DoRA scales are per input channel (LyCORIS wd_on_output=False): WebUI/ComfyUI "
                              "apply them, diffusers and PEFT cannot.")
        else:
            info.notes.append("DoRA scales are per output channel (PEFT / LyCORIS wd_on_output=True): LyCORIS and "
                              "ComfyUI apply them; AUTOMATIC1111 WebUI only knows the per-input layout and "
                              "distorts this LoRA; diffusers drops them and applies the plain LoRA part.")
        break


def lora_files_of(family: str) -> Any:
    """The family's own LoRA file layout (`core.families.base.LoraFileFormat`), None for the UNet families."""
    info = FAMILIES.get(family)
    if info is None or info.kind == "unet":
        return None
    from core.family_api.lookup import family_impl

    return family_impl(family).lora_files


def _transformer_modules(info: LoraFileInfo, file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Modules of a transformer family's LoRA under diffusers' names, with the rank and alpha of each part:
    a fused native module (FLUX's qkv, linear1) is split back into its diffusers parts by the family."""
    from core.export.kohya import LoraFormatError

    try:
        peft, alphas = lora_files_of(info.family).to_peft(file)
    except (LoraFormatError, ValueError) as exc:
        info.notes.append(f"Read as plain kohya modules (the {family_label(info.family)} reader refused it: {exc}).")
        _kohya_modules(info, {k: v for k, v in tensors.items() if k.startswith(KOHYA_PREFIXES)})
        return
    for path, alpha in sorted(alphas.items()):
        info.modules[f"transformer.{path}"] = (int(peft[f"{path}.lora_A.weight"].shape[0]), float(alpha))
    encoders = {k: v for k, v in tensors.items() if k.startswith(("lora_te", "text_encoder"))}
    if encoders and info.format != "diffusers":
        _kohya_modules(info, encoders)
    elif encoders:
        info.has_text_encoder = True
        info.notes.append(f"{len(encoders)} text encoder tensor(s) are not listed module by module.")
    if info.format != "diffusers" and any(k.startswith(("lora_unet_", COMFY_PREFIX)) for k in tensors):
        info.notes.append("Native module names (WebUI / Forge / ComfyUI); fused modules (FLUX's qkv / linear1) "
                          "are listed as their diffusers parts.")


def _adapter_modules(info: LoraFileInfo, tensors: dict[str, torch.Tensor], fmt: str,
                     adapter_config: dict | None) -> None:
    configs = _diffusers_configs(info.metadata) if fmt == "diffusers" else {}
    unknown_alpha = False
    for key, value in tensors.items():
        m = _ADAPTER_PART.match(key)
        if not m or not m["part"].endswith(("lora_A", "down")):
            continue
        module = m["module"]
        rank = int(value.shape[0])
        component, _, inner = module.partition(".")
        if fmt == "diffusers" and component in DIFFUSERS_COMPONENTS:
            config = configs.get(component)
        else:
            component, inner, config = "", module.removeprefix("base_model.model."), adapter_config
        alpha, known = _config_alpha(config, inner, rank)
        unknown_alpha |= not known
        info.modules[module] = (rank, alpha)
        info.has_text_encoder |= component.startswith("text_encoder")
        info.has_conv |= value.dim() == 4 and tuple(value.shape[2:]) != (1, 1)
    if unknown_alpha:
        info.notes.append("No alpha stored (no adapter metadata): loaders assume alpha = rank, so a LoRA "
                          "trained with another alpha loads at the wrong strength.")


def distillation_pair(a: Any, b: Any) -> bool:
    """Two registry rows of one base model and its distilled model (the registry's training_base /
    sample_base): a LoRA trained on one is meant for the other."""
    return a.impl == b.impl and any(x in (y.training_base, y.sample_base) for x, y in
                                    ((a.hub_repo, b), (b.hub_repo, a)))


def lora_family_mismatch(info: LoraFileInfo, model_family: str) -> str | None:
    """A sentence when the LoRA was made for another model family than `model_family`, else None."""
    if info.family == "unknown" or model_family not in FAMILY_NAMES or info.family == model_family:
        return None
    lora_info, model_info = FAMILIES.get(info.family), FAMILIES.get(model_family)
    if lora_info and model_info and lora_info.ss_base_model_version == model_info.ss_base_model_version:
        return None  # FLUX.1-dev and -schnell LoRAs are one kind (flux1), used on either
    if lora_info and model_info and distillation_pair(lora_info, model_info):
        return None  # trained on the base (Z-Image), used on its distilled model (Turbo), or the other way
    if lora_info and model_info and lora_info.kind != "unet" and lora_info.impl == model_info.impl \
            and info.format == "diffusers" and not lora_info.lora_shape_markers:
        return None  # a diffusers file does not name the variant (FLUX.1 or Chroma): only its keys could
    lora_name = FAMILY_NAMES.get(info.family, info.family)
    model_name = FAMILY_NAMES[model_family]
    return (f"This LoRA ({info.path.name}) was trained for {lora_name}; the loaded model is {model_name}. "
            f"Load a {lora_name} model, or pick a LoRA trained for {model_name}.")
