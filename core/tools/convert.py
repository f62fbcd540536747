"""Read any LoRA file into modules, and write it back as kohya/WebUI, diffusers or PEFT.

Formats:
  kohya      one .safetensors with `lora_unet_...` / `lora_te...` keys (WebUI, ComfyUI, sd-scripts)
  diffusers  `pytorch_lora_weights.safetensors` (`unet.` / `text_encoder.` keys, alpha in the
             `lora_adapter_metadata` header)
  peft       an adapter folder (adapter_config.json + adapter_model.safetensors), or the single
             file `peft_to_single_file` makes (the same keys, the config in the header)

Image LoRAs are always held under their kohya names, so resize/merge see one naming scheme;
FLUX.1 / Chroma LoRAs under BFL's kohya names (core.families.flux.tools_files). Families come from
the family table (core.family_api.registry).
Pickled files (.ckpt/.pt/.bin) are refused unless the caller passes `allow_pickle`.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.atomic import atomic_dir, save_file_atomic
from core.devices import torch_dtype
from core.export.inspect import COMFY_PREFIX, DIFFUSERS_COMPONENTS, KOHYA_PREFIXES, lora_files_of
from core.family_api.registry import FALLBACK_FAMILY, FAMILIES
from core.tools.modules import (LoraModule, LoraToolError, cast_modules, modules_from_kohya, modules_from_peft,
                                modules_to_kohya, modules_to_peft)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
SINGLE_FILE_CONFIG_KEY = "adapter_config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = ("fp16", "bf16", "fp32", "keep")  # keep: each tensor's own dtype


@dataclass
class LoraFile:
    """A LoRA in memory: its modules (kohya names for image LoRAs, PEFT paths for text adapters)."""

    format: str                      # kohya | diffusers | peft
    family: str                      # a registry family (sd1 ... flux-dev, chroma) | llm
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    peft_config: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def is_image(self) -> bool:
        return self.family in FAMILIES

    @property
    def own_format(self) -> Any:
        """The family's own LoRA file layout (FLUX.1, Chroma, ...), None for the UNet families."""
        return lora_files_of(self.family)

    @property
    def has_dora(self) -> bool:
        return any(m.dora_scale is not None for m in self.modules.values())


def parse_dtype(name: str | None) -> torch.dtype | None:
    key = (name or "keep").lower()
    if key not in DTYPES:
        raise LoraToolError(f"Unknown precision '{name}'; use one of {', '.join(DTYPES)}.")
    return None if key == "keep" else torch_dtype(key)


# --- reading ------------------------------------------------------------------------------------

def _load_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraToolError(f"'{path.name}' is a pickle file ({path.suffix}), which can run code when loaded. "
                                "Use a .safetensors file, or pass --allow-pickle if you trust it.")
        data = torch.load(path, map_location="cpu", weights_only=True)
        while isinstance(data, dict) and "state_dict" in data:
            data = data["state_dict"]
        return {k: v for k, v in data.items() if isinstance(v, Tensor)}, {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as exc:
        raise LoraToolError(f"'{path}' is not a readable .safetensors file: {exc}") from exc


def detect_format(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    keys = list(tensors)
    if any(k.startswith((*KOHYA_PREFIXES, COMFY_PREFIX)) for k in keys):
        return "kohya"  # ComfyUI's diffusion_model.<BFL name> keys are kohya's modules too
    if SINGLE_FILE_CONFIG_KEY in metadata or any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in keys):
        return "diffusers"
    sample = ", ".join(keys[:3])
    raise LoraToolError(f"Cannot tell the LoRA format from the keys ({sample} ...): expected kohya "
                        "(lora_unet_...), diffusers (unet./text_encoder.) or PEFT (base_model.model.) keys.")


def detect_image_family(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """The image family (sd1 ... flux-dev, chroma) of a LoRA, from its metadata, then its keys and shapes."""
    from core.export.inspect import family_from_keys, family_from_metadata

    family = family_from_metadata(metadata) or family_from_keys(
        {k: tuple(v.shape) for k, v in tensors.items()}, "kohya", None)
    return family if family in FAMILIES else FALLBACK_FAMILY


def diffusers_to_kohya_tensors(tensors: dict[str, Tensor], metadata: dict[str, str], family: str
                               ) -> dict[str, Tensor]:
    """A diffusers LoRA state dict (+ header) -> kohya tensors (alpha from the header, else = rank)."""
    from core.export.diffusers_format import diffusers_lora_to_peft
    from core.export.kohya import peft_to_kohya

    unet, tes, alphas = diffusers_lora_to_peft(tensors, metadata)
    if tes[1] and "text_encoder_2" not in FAMILIES[family].text_encoders:
        two = [i.name for i in FAMILIES.values() if i.kind == "unet" and "text_encoder_2" in i.text_encoders]
        raise LoraToolError(f"The file has text_encoder_2 weights, so it is a LoRA of a model with two text "
                            f"encoders; use family {' or '.join(two)}.")
    return peft_to_kohya(unet, tes if tes[1] else tes[:1], family, alphas=alphas)


def read_lora(path: str | Path, *, family: str | None = None, allow_pickle: bool = False) -> LoraFile:
    """Read a kohya / diffusers / PEFT LoRA (file or adapter folder) into a `LoraFile`."""
    file = Path(path)
    if file.is_dir():
        return _read_peft_folder(file, allow_pickle)
    if not file.is_file():
        raise LoraToolError(f"The LoRA '{file}' does not exist.")
    tensors, metadata = _load_tensors(file, allow_pickle)
    if not tensors:
        raise LoraToolError(f"'{file}' holds no tensors.")
    kind = detect_format(tensors, metadata)
    if kind == "peft":
        config = json.loads(metadata.get(SINGLE_FILE_CONFIG_KEY, "{}"))
        if not config:
            raise LoraToolError(f"'{file.name}' has PEFT keys but no adapter_config; pass the adapter folder instead.")
        return LoraFile("peft", "llm", modules_from_peft(tensors, config, file.name), metadata, config, str(file))
    fam = family or detect_image_family(tensors, metadata)
    own = lora_files_of(fam)
    if own is not None:
        return LoraFile(kind, fam, modules_from_kohya(own.to_kohya(file, tensors), file.name), metadata,
                        {}, str(file))
    if kind == "diffusers":
        tensors = diffusers_to_kohya_tensors(tensors, metadata, fam)
    return LoraFile(kind, fam, modules_from_kohya(tensors, file.name), metadata, {}, str(file))


def _read_peft_folder(folder: Path, allow_pickle: bool) -> LoraFile:
    config_file = folder / PEFT_CONFIG_NAME
    if not config_file.is_file():
        diffusers_file = folder / "pytorch_lora_weights.safetensors"
        if diffusers_file.is_file():
            return read_lora(diffusers_file, allow_pickle=allow_pickle)
        raise LoraToolError(f"'{folder}' is a folder without {PEFT_CONFIG_NAME}: not a PEFT adapter.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        weights = folder / PEFT_PICKLE_NAME
        if not weights.is_file():
            raise LoraToolError(f"'{folder}' has no {PEFT_WEIGHTS_NAME}.")
    tensors, metadata = _load_tensors(weights, allow_pickle)
    return LoraFile("peft", "llm", modules_from_peft(tensors, config, str(folder)), metadata, config, str(folder))


# --- writing ------------------------------------------------------------------------------------

def _image_metadata(lora: LoraFile, extra: dict[str, str] | None) -> dict[str, str]:
    from core.export.metadata import base_model_version, modelspec_architecture

    meta = {k: v for k, v in lora.metadata.items()
            if k.startswith(("ss_", "modelspec.")) and not k.startswith("sshs_")}
    ranks = Counter(m.rank for m in lora.modules.values() if not m.is_conv)
    alphas = Counter(m.alpha for m in lora.modules.values() if not m.is_conv)
    meta.setdefault("ss_base_model_version", base_model_version(lora.family))
    meta.setdefault("ss_v2", str(("ss_v2", "True") in getattr(FAMILIES.get(lora.family), "metadata_markers", ())))
    meta.setdefault("modelspec.architecture", modelspec_architecture(lora.family))
    meta.setdefault("modelspec.sai_model_spec", "1.0.1")
    meta["ss_network_module"] = "networks.lora"
    if ranks:
        meta["ss_network_dim"] = str(ranks.most_common(1)[0][0])
        meta["ss_network_alpha"] = f"{alphas.most_common(1)[0][0]:g}"
    meta.update(extra or {})
    return meta


def write_kohya(lora: LoraFile, path: str | Path, *, dtype: torch.dtype | None = torch.float16,
                metadata: dict[str, str] | None = None) -> Path:
    """A WebUI/ComfyUI .safetensors (hashes and ss_* metadata included), written atomically."""
    from core.export.kohya import save_kohya_lora

    if not lora.is_image:
        raise LoraToolError("A text (LLM) adapter has no kohya/WebUI format; write it as a PEFT adapter.")
    if lora.own_format is not None:
        return lora.own_format.write_kohya(lora.modules, path, variant=lora.family,
                                           metadata={**lora.metadata, **(metadata or {})}, dtype=dtype)
    return save_kohya_lora(path, modules_to_kohya(lora.modules), _image_metadata(lora, metadata), dtype=dtype)


def _diffusers_config(states: dict[str, Tensor], alphas: dict[str, float], dora: bool, text_encoder: bool):
    from peft import LoraConfig

    ranks = {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in states.items() if k.endswith(".lora_A.weight")}
    if not ranks:
        return None
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[p] for p in ranks).most_common(1)[0][0]

    def pattern(path: str) -> str:
        # Text encoders load with or without transformers' `text_model.` wrapper: match the tail.
        return re.escape(path.removeprefix("text_model.") if text_encoder else path)
    targets = sorted({p.removeprefix("text_model.") for p in ranks} if text_encoder else ranks)
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora,
                      rank_pattern={pattern(p): v for p, v in ranks.items() if v != r},
                      alpha_pattern={pattern(p): alphas[p] for p in ranks if alphas[p] != alpha})


def write_diffusers(lora: LoraFile, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """`folder/pytorch_lora_weights.safetensors` with each component's alpha in the header."""
    from core.export.diffusers_format import save_diffusers_lora
    from core.export.kohya import kohya_to_peft

    if not lora.is_image:
        raise LoraToolError("diffusers' LoRA file is for image models; a text adapter stays a PEFT adapter.")
    if lora.own_format is not None:
        return lora.own_format.write_diffusers(lora.modules, folder, dtype=dtype)
    unet, tes, alphas = kohya_to_peft(modules_to_kohya(lora.modules), lora.family)
    names = ("text_encoder", "text_encoder_2")

    def component_alphas(name: str) -> dict[str, float]:
        return {k[len(name) + 1:]: v for k, v in alphas.items() if k.startswith(name + ".")}
    unet_config = _diffusers_config(unet, component_alphas("unet"), lora.has_dora, False)
    te_configs = [_diffusers_config(sd, component_alphas(names[i]), lora.has_dora, True) for i, sd in enumerate(tes)]
    while tes and not tes[-1]:
        tes.pop()
        te_configs.pop()
    return save_diffusers_lora(folder, lora.family, unet, tes, unet_lora_config=unet_config,
                               text_encoder_lora_configs=te_configs, dtype=dtype)


def check_replaceable_folder(folder: str | Path, markers: tuple[str, ...]) -> None:
    """Refuse to replace a non-empty folder that is not an earlier result of the same kind.

    Folder outputs are written whole and renamed over the target, so a typo such as `--output output/`
    must not wipe a folder of other files.
    """
    target = Path(folder)
    if target.is_file():
        raise LoraToolError(f"'{target}' is a file; give a folder name for this output.")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).exists() for m in markers):
        raise LoraToolError(f"'{target}' already holds other files; choose a new or empty folder for the output "
                            "(it would be replaced as a whole).")


def write_peft(lora: LoraFile, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), written atomically."""
    from safetensors.torch import save_file

    if lora.format != "peft":
        raise LoraToolError("Only text adapters are written as PEFT folders; image LoRAs go to kohya or diffusers.")
    check_replaceable_folder(folder, (PEFT_CONFIG_NAME,))
    state, config = modules_to_peft(cast_modules(lora.modules, dtype), lora.peft_config)
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return Path(folder)


def peft_to_single_file(adapter: str | Path, output: str | Path, *, dtype: torch.dtype | None = None,
                        allow_pickle: bool = False) -> Path:
    """A PEFT adapter folder -> one .safetensors (the adapter's own keys, its config in the header).

    The tensors are exactly PEFT's (`base_model.model....lora_A.weight`), so servers that take a
    PEFT state dict (vLLM/LoRAX after `single_file_to_peft`, llama.cpp's convert_lora_to_gguf.py
    after the same) read them; the header keeps `adapter_config` so nothing is lost.
    """
    folder = Path(adapter)
    config_file = folder / PEFT_CONFIG_NAME
    if not config_file.is_file():
        raise LoraToolError(f"'{folder}' is not a PEFT adapter folder (no {PEFT_CONFIG_NAME}).")
    lora = _read_peft_folder(folder, allow_pickle)
    tensors, _ = _load_tensors(folder / PEFT_WEIGHTS_NAME if (folder / PEFT_WEIGHTS_NAME).is_file()
                               else folder / PEFT_PICKLE_NAME, allow_pickle)
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in tensors.items()}
    ranks = Counter(m.rank for m in lora.modules.values())
    metadata = {"format": "pt", SINGLE_FILE_CONFIG_KEY: json.dumps(lora.peft_config, sort_keys=True),
                "lora_rank": str(ranks.most_common(1)[0][0]) if ranks else "0",
                "lora_alpha": str(lora.peft_config.get("lora_alpha", "")),
                "base_model": str(lora.peft_config.get("base_model_name_or_path") or "")}
    return save_file_atomic(cast, output, metadata=metadata)


def single_file_to_peft(path: str | Path, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """The reverse of `peft_to_single_file`: back to an adapter folder PeftModel.from_pretrained reads."""
    lora = read_lora(path)
    if lora.format != "peft":
        raise LoraToolError(f"'{path}' is a {lora.format} LoRA, not a single-file PEFT adapter.")
    return write_peft(lora, folder, dtype=dtype)


def convert_lora(source: str | Path, output: str | Path, to: str, *, family: str | None = None,
                 dtype: torch.dtype | None = None, allow_pickle: bool = False,
                 pissa_initial: str | Path | None = None) -> Path:
    """Convert `source` to `to` (kohya | diffusers | peft | peft-single); returns what was written.

    `pissa_initial`: the PiSSA adapter as it was right after initialisation; the result is then the
    equivalent plain LoRA for the ORIGINAL base model (core.tools.pissa).
    """
    if to == "peft-single":
        if pissa_initial:
            raise LoraToolError("Convert the PiSSA adapter to a PEFT folder first (--to peft), then to one file.")
        return peft_to_single_file(source, output, dtype=dtype, allow_pickle=allow_pickle)
    lora = read_lora(source, family=family, allow_pickle=allow_pickle)
    if pissa_initial:
        from core.tools.pissa import pissa_to_lora

        initial = read_lora(pissa_initial, family=lora.family if lora.is_image else None, allow_pickle=allow_pickle)
        lora.modules = pissa_to_lora(lora.modules, initial.modules)
    if to == "kohya":
        return write_kohya(lora, output, dtype=dtype)
    if to == "diffusers":
        return write_diffusers(lora, output, dtype=dtype)
    if to == "peft":
        return write_peft(lora, output, dtype=dtype)
    raise LoraToolError(f"Unknown target format '{to}'; use kohya, diffusers, peft or peft-single.")


def write_like(lora: LoraFile, output: str | Path, *, dtype: torch.dtype | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write `lora` in its own format (kohya stays kohya, a PEFT adapter a PEFT folder ...)."""
    if lora.format == "peft":
        if str(output).endswith(".safetensors"):
            raise LoraToolError(f"'{output}': a PEFT adapter is written as a folder; give a folder name.")
        return write_peft(lora, output, dtype=dtype)
    if lora.format == "diffusers" and not str(output).endswith(".safetensors"):
        return write_diffusers(lora, output, dtype=dtype)
    return write_kohya(lora, output, dtype=dtype, metadata=metadata)
