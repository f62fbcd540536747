"""SD3 / SD3.5 in ComfyUI's layouts: SAI's all-in-one file (MMDiT, CLIP-L, CLIP-G, T5 and VAE under their
prefixes), or the MMDiT alone with its text encoders and VAE found beside it (or given). Configs and
tokenizers come from a diffusers folder or hub id (`config_source`); every part is found before any
weights are read, so a missing file fails at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.families.dit.folders import fitting, quantized
from core.families.dit.weights import (comfy_models_root, file_has_fp8, fp8_note, read_upcast, safetensors_keys,
                                       strip_encoder_prefix, tie_t5_embedding)
from core.families.sd3.load import (EMBEDDED, HUB_CONFIGS, PART_FOLDERS, PART_WORDS, SD3Model, _load_error,
                                    _scheduler_config, _tokenizers, model_type_from_keys)
from core.family_api.contract import ModelLoadError
from core.hub import offline


def find_part(models_root: Path | None, part: str, explicit: str = "", *, required: bool = True) -> Path | None:
    """A text encoder / VAE file: `explicit` if given, else found in ComfyUI's folders by its usual name."""
    if explicit:
        if not Path(explicit).is_file():
            raise ModelLoadError(f"The {part} file '{explicit}' does not exist.", f"Check the {part} path.")
        return Path(explicit)
    candidates: list[Path] = []
    for sub in PART_FOLDERS[part] if models_root is not None else ():
        folder = models_root / sub
        if folder.is_dir():
            candidates += sorted(p for p in folder.rglob("*.safetensors")
                                 if any(w in p.name.lower() for w in PART_WORDS[part]))
    if part == "vae":
        candidates.sort(key=lambda p: 0 if "sd3" in p.name.lower() else 1)
    if candidates:
        return candidates[0]
    if not required:
        return None
    where = " or ".join(str(models_root / s) for s in PART_FOLDERS[part]) if models_root else \
        f"ComfyUI's models/{PART_FOLDERS[part][0]}/"
    hint = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors",
            "vae": "the SD3 VAE (or use the all-in-one sd3.5_*.safetensors, which holds it)"}[part]
    raise ModelLoadError(f"SD3 needs {hint}, and none was found.",
                         f"Put the file in {where}" + (", or give its path in the vae setting." if part == "vae"
                                                       else "."))


def _part_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _text_encoder(state: dict[str, torch.Tensor], kind: str, source: str, local_only: bool,
                  dtype: torch.dtype) -> tuple[Any, list[str]]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel


    sub = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}[kind]
    config_cls, model_cls, marker = ((T5Config, T5EncoderModel, "encoder.") if kind == "t5"
                                     else (CLIPTextConfig, CLIPTextModelWithProjection, "text_model."))
    try:
        config = config_cls.from_pretrained(source, subfolder=sub if Path(source, sub).is_dir() or
                                            not Path(source).is_dir() else "", local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _load_error(sub, source, exc) from exc
    notes = []
    if kind == "t5":
        tie_t5_embedding(state, "The T5-XXL file")
    else:
        projection = state.pop("text_projection.weight", None)
        state = strip_encoder_prefix(state, marker)
        if projection is None:
            # ComfyUI runs a CLIP file without a projection with the identity (its pooled output as it is).
            projection = torch.eye(config.projection_dim, config.hidden_size, dtype=dtype)
            notes.append(f"{kind}: no text_projection in the file, identity used (as ComfyUI does).")
        state["text_projection.weight"] = projection
    return model_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype).eval(), notes


def load_transformer_state(state: dict[str, torch.Tensor], *, source: str, local_only: bool, dtype: torch.dtype,
                           name: str, quantization_config: Any = None) -> Any:
    from diffusers import SD3Transformer2DModel

    from core.families.sd3.keys import strip_prefix

    mmdit = strip_prefix(state)
    sub = "transformer" if Path(source, "transformer").is_dir() or not Path(source).is_dir() else None
    with fitting(name, lambda exc: _load_error("transformer", source, exc), f"does not fit the SD3 config from '{source}'",
                 "Check that base_model_config is a diffusers folder of the same SD3 model (SD3 medium, SD3.5 medium "
                 "and SD3.5 large differ)."):
        return SD3Transformer2DModel.from_single_file(mmdit, config=source, subfolder=sub, torch_dtype=dtype,
                                                      local_files_only=local_only, **quantized(quantization_config))


def load_sd3_single_file(path: str | Path, *, config_source: str = "", clip_l: str = "", clip_g: str = "",
                         t5: str = "", vae: str = "", dtype: torch.dtype = torch.float32,
                         quantization_config: Any = None) -> SD3Model:
    """SAI's all-in-one file, or the MMDiT alone with its text encoders and VAE found beside it (or given)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"The SD3 model file '{path}' does not exist.", "Check base_model.")
    keys = safetensors_keys(path)
    model_type = model_type_from_keys(keys)
    if model_type is None:
        raise ModelLoadError(f"'{path.name}' is not an SD3 / SD3.5 MMDiT file.",
                             "Use sd3.5_medium.safetensors / sd3.5_large.safetensors or the transformer file "
                             "from ComfyUI's models/diffusion_models.")
    embedded = {part for part, prefix in EMBEDDED.items() if any(k.startswith(prefix) for k in keys)}
    root = comfy_models_root(path, ("diffusion_models", "unet", "checkpoints"))
    # Find every part before reading weights: a missing file fails in a second, not after minutes.
    files = {part: find_part(root, part, explicit, required=part != "t5")
             for part, explicit in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("vae", vae))
             if explicit or part not in embedded}
    source = config_source or HUB_CONFIGS[model_type]
    local_only = Path(source).is_dir() or offline()
    state = read_upcast(path, dtype)
    notes = []
    transformer = load_transformer_state(state, source=source, local_only=local_only, dtype=dtype, name=path.name,
                                         quantization_config=quantization_config)
    parts: dict[str, Any] = {}
    for part in ("clip_l", "clip_g", "t5", "vae"):
        if files.get(part) is not None:
            part_state, where = read_upcast(files[part], dtype), files[part].name
        elif part in embedded:
            part_state, where = _part_state(state, EMBEDDED[part]), f"{path.name} (inside)"
        else:
            parts[part] = None
            notes.append("No T5-XXL file found: its part of the prompt encoding is zeros (SD3 without T5).")
            continue
        if part == "vae":
            sub = "vae" if Path(source, "vae").is_dir() or not Path(source).is_dir() else None
            try:
                parts[part] = AutoencoderKL.from_single_file(part_state, config=source, subfolder=sub,
                                                             torch_dtype=dtype, local_files_only=local_only)
            except OSError as exc:
                raise _load_error("vae", source, exc) from exc
            except (KeyError, ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"'{where}' is not the SD3 VAE: {exc}",
                                     "SD3 uses a 16-channel VAE; give its file in the vae setting.") from exc
        else:
            parts[part], extra = _text_encoder(part_state, part, source, local_only, dtype)
            notes += extra
        notes.append(f"{ {'clip_l': 'CLIP-L', 'clip_g': 'CLIP-G', 't5': 'T5', 'vae': 'VAE'}[part]}: {where}")
    del state
    if file_has_fp8(path):
        notes.append(fp8_note(path, dtype))
    tok_l, tok_g, tok_t5 = _tokenizers(source, local_only, parts["t5"] is not None)
    return SD3Model(model_type, transformer, parts["vae"], parts["clip_l"], tok_l, parts["clip_g"], tok_g,
                    parts["t5"], tok_t5, scheduler_config=_scheduler_config(source, local_only), source=str(path),
                    is_single_file=True,
                    notes=notes)


def load_sd3_single_file_vae(path: str, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    from diffusers import AutoencoderKL

    local_only = Path(config_source).is_dir() or offline()
    state = read_upcast(path, dtype)
    if any(k.startswith(EMBEDDED["vae"]) for k in state):
        state = _part_state(state, EMBEDDED["vae"])
    try:
        return AutoencoderKL.from_single_file(state, config=config_source, subfolder="vae", torch_dtype=dtype,
                                              local_files_only=local_only)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' is not the SD3 VAE: {exc}",
                             "SD3 uses a 16-channel VAE; give its file in the vae setting.") from exc
