"""Weight files as users have them: safetensors headers, fp8 checkpoints, ComfyUI's folders, config folders.

Detection reads only safetensors headers and config JSON. fp8 files (`float8_e4m3fn`, also ComfyUI's
"scaled fp8") are upcast to the compute dtype. A single file carries no configs: those come from a
diffusers folder or hub id (`config_subfolder`, `local_only`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from core.family_api.contract import ModelLoadError
from core.hub import offline

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The folders of ComfyUI's models/ where a diffusion model file sits.
DIFFUSION_MODEL_FOLDERS = ("diffusion_models", "unet")


def model_folder_on_meta(cls: Any, folder: Path, dtype: torch.dtype) -> Any | None:
    """A diffusers model folder (`config.json` + `diffusion_pytorch_model[.safetensors | -0000N-of-...]`) built on
    the meta device and its weights assigned from the files, or None where that cannot be exact (no such files,
    a tensor the files lack). `from_pretrained` builds the weights' tensors on the meta device too, but not the
    buffers, so whatever a model's __init__ computes into them is computed for nothing before the file's values
    replace it: SD3.5's sin-cos position table (147456 x 1536, 0.9 GB) took 7 s and 2.5 GB at every load."""
    from safetensors.torch import load_file

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [folder / "diffusion_pytorch_model.safetensors"]
    if not (folder / "config.json").is_file() or not all(f.is_file() for f in files):
        return None
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if set(state) != set(model.state_dict()):
        return None
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None  # a buffer the files do not hold (not persistent): only __init__ makes it
    return model.eval()


def safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of a .safetensors file (the header only: no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise ModelLoadError(f"'{Path(path).name}' is not a readable .safetensors file: {exc}",
                             "The file is damaged or incomplete: download it again.") from exc


def file_has_fp8(path: str | Path) -> bool:
    """True when any tensor of the file is stored as float8 (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return any(handle.get_slice(k).get_dtype().startswith("F8") for k in handle.keys())


def fp8_note(path: Path, dtype: torch.dtype) -> str:
    """The log line for an fp8 model file."""
    return f"{path.name} is fp8: weights upcast to {str(dtype).replace('torch.', '')} for training."


def read_upcast(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; fp8 ones upcast to `dtype`, scaled-fp8 ones rescaled.

    ComfyUI's "scaled fp8" files store `<layer>.scale_weight` next to each fp8 weight: the
    real weight is fp8 * scale. Their bookkeeping tensors (`scaled_fp8`, `scale_input`) go.
    Its newer "fp8mixed" files (FLUX.2 dev, Mistral-Small) store `<layer>.weight_scale` next to an fp8
    weight, with `comfy_quant` and `input_scale` bookkeeping.
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt") as handle:
        names = list(handle.keys())
        keys = set(names)
        for key in names:
            tensor = handle.get_tensor(key)
            if key.endswith(".scale_weight"):
                scales[key[: -len(".scale_weight")] + ".weight"] = tensor
            elif key.endswith(".weight_scale") and key[: -len("_scale")] in keys:
                scales[key[: -len("_scale")]] = tensor
            elif key.endswith((".scale_input", ".input_scale", ".comfy_quant")) or key.split(".")[-1] == "scaled_fp8":
                continue
            else:
                out[key] = tensor.to(dtype) if tensor.dtype in FP8_DTYPES else tensor
    for key, scale in scales.items():
        if key in out:
            out[key] = (out[key].to(torch.float32) * scale.to(torch.float32)).to(dtype)
    return out


def read_json(path: Path) -> dict[str, Any] | None:
    """A config JSON file, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def comfy_models_root(model_file: str | Path, folders: Sequence[str] = DIFFUSION_MODEL_FOLDERS) -> Path | None:
    """ComfyUI's `models/` folder when the file sits (up to two levels down) in one of `folders` of it."""
    parent = Path(model_file).resolve().parent
    for folder in [parent, *parent.parents][:3]:
        if folder.name in folders:
            return folder.parent
    return None


def local_only(source: str) -> bool:
    """Read configs without the network: a local folder, or the hub switched off (core.hub.offline)."""
    return Path(source).is_dir() or offline()


def config_subfolder(source: str, name: str) -> str | None:
    """The subfolder `name` of a config source; None when the folder is the component folder itself
    (a config folder may be a whole pipeline, with transformer/, or just the transformer's)."""
    path = Path(source)
    if path.is_dir() and not (path / name).is_dir() and (path / "config.json").is_file():
        return None
    return name


def strip_encoder_prefix(state: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor]:
    """A text encoder's state without a pack's prefix (e.g. "text_encoders.clip_l.transformer."): each key
    cut where the first key holding `marker` has it."""
    first = next((k for k in state if marker in k), None)
    if first is None or first.startswith(marker):
        return state
    cut = first.index(marker)
    return {k[cut:]: v for k, v in state.items() if len(k) > cut}


def tie_t5_embedding(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A T5 encoder state with both names of its tied input embedding (files keep one of the two);
    `name` names the file in the message when it has neither."""
    shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if shared is None:
        raise ModelLoadError(f"'{name}' has no T5 token embedding (shared.weight).",
                             "Use an HF-format T5-XXL encoder file such as t5xxl_fp16.safetensors.")
    state.setdefault("shared.weight", shared)
    state.setdefault("encoder.embed_tokens.weight", shared)
    return state


def detect_source(base_model: str, *, fits: Callable[[list[str]], bool], file_variant: Callable[[Path], str | None],
                  folder_variant: Callable[[Path, dict[str, Any], dict[str, Any]], str | None],
                  hub_variant: Callable[[str], str | None]) -> str | None:
    """A family's variant of a model source, or None where it is not the family's: a transformer file (a
    .safetensors whose tensor names `fits`), a diffusers folder (`folder_variant(path, model_index.json,
    the transformer's config)`, {} for one it lacks) or a hub id (`hub_variant`; a file name is none)."""
    path = Path(base_model)
    if path.is_file():
        if path.suffix.lower() != ".safetensors" or not fits(safetensors_keys(path)):
            return None
        return file_variant(path)
    if path.is_dir():
        index = read_json(path / "model_index.json") or {}
        transformer = read_json(path / "transformer" / "config.json") or read_json(path / "config.json") or {}
        return folder_variant(path, index, transformer)
    if base_model.lower().endswith(".safetensors") or "/" not in base_model:
        return None
    return hub_variant(base_model)
