"""FLUX.1 / Chroma in ComfyUI's layout: one file per part.

The BFL-named transformer under `models/diffusion_models` (or `models/unet`), CLIP-L and
T5-XXL under `models/text_encoders` (or `models/clip`), the AE under `models/vae`. Single
files carry no configs or tokenizers, so those come from a diffusers config folder
(`config_source`, the project's `base_model_config`; the weights are not needed there).
Every part is found before any weights are read, so a missing file fails at once, with
its name and the folder it belongs in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.families.dit.folders import fitting, quantized
from core.families.flux.convert import BFL_PREFIXES, bfl_to_diffusers
from core.families.dit.weights import (comfy_models_root, config_subfolder, file_has_fp8, fp8_note, read_upcast,
                                       safetensors_keys, strip_encoder_prefix, tie_t5_embedding)
from core.families.flux.load import FluxModel, _config_source, _load_error, _scheduler_config, _tokenizers, variant_from_keys
from core.family_api.contract import ModelLoadError

# --- the ComfyUI layout --------------------------------------------------------------------------

# Where ComfyUI keeps each part, and the words its usual file names contain.
PART_FOLDERS = {"clip_l": ("text_encoders", "clip"), "t5": ("text_encoders", "clip"), "vae": ("vae",)}
PART_WORDS = {"clip_l": ("clip_l", "clip-l", "clipl"), "t5": ("t5xxl", "t5-xxl", "t5_xxl", "t5"),
              "vae": ("ae.", "flux_vae", "flux-vae", "ae_", "vae")}
PART_HINTS = {"clip_l": "clip_l.safetensors (CLIP-L)", "t5": "t5xxl_fp16.safetensors (T5-XXL; fp8 works too)",
              "vae": "ae.safetensors (the FLUX autoencoder)"}


def find_part(models_root: Path | None, part: str, explicit: str = "") -> Path:
    """The CLIP-L / T5 / VAE file: `explicit` if given, else found under ComfyUI's folders."""
    if explicit:
        if not Path(explicit).is_file():
            raise ModelLoadError(f"The {part} file '{explicit}' does not exist.", f"Check the {part} path.")
        return Path(explicit)
    candidates: list[Path] = []
    if models_root is not None:
        for sub in PART_FOLDERS[part]:
            folder = models_root / sub
            if folder.is_dir():
                candidates += sorted(p for p in folder.rglob("*.safetensors")
                                     if any(w in p.name.lower() for w in PART_WORDS[part]))
    if part == "vae":
        # The AE of FLUX is usually ae.safetensors; prefer names that say flux or ae over a generic VAE.
        candidates.sort(key=lambda p: (0 if p.name.lower().startswith("ae") or "flux" in p.name.lower() else 1))
    if not candidates:
        where = " or ".join(f"{models_root / s}" for s in PART_FOLDERS[part]) if models_root else \
            f"ComfyUI's models/{PART_FOLDERS[part][0]}/"
        raise ModelLoadError(f"FLUX needs {PART_HINTS[part]}, and none was found.",
                             f"Put the file in {where}, or give its path in the {part} setting.")
    return candidates[0]


def load_transformer_file(path: str | Path, *, config_source: str = "", dtype: torch.dtype = torch.float32,
                          variant: str | None = None, quantization_config: Any = None) -> Any:
    """A FLUX.1 / Chroma transformer from a BFL single file (any prefix, fp8 upcast to `dtype`).

    `quantization_config` (e.g. `core.families.dit.low_memory.nf4_config()`) quantizes it while loading.
    """
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    variant = variant or variant_from_keys(safetensors_keys(path))
    if variant is None:
        raise ModelLoadError(f"'{Path(path).name}' is not a FLUX.1 or Chroma transformer.",
                             "Use the transformer file from models/diffusion_models (flux1-dev.safetensors etc.).")
    source, local_only = _config_source(variant, config_source)
    state = read_upcast(path, dtype)
    if any(k.startswith(BFL_PREFIXES) for k in state):
        # An all-in-one checkpoint also holds the VAE and text encoders: keep the diffusion model only.
        state = {k: v for k, v in state.items() if k.startswith(BFL_PREFIXES)}
    misfit = f"does not fit the {variant} config from '{source}'"
    with fitting(Path(path).name, lambda exc: _load_error("transformer", source, exc), misfit,
                 "Check that base_model_config is a diffusers folder of the same model, and that the file is a "
                 "complete FLUX transformer."):
        # Diffusers-named single files load as they are; BFL names are converted first.
        converted = bfl_to_diffusers(state) if any("double_blocks." in k for k in state) else state
        del state
        depth = {"num_layers": len({int(k.split(".")[1]) for k in converted if k.startswith("transformer_blocks.")}),
                 "num_single_layers": len({int(k.split(".")[1]) for k in converted
                                           if k.startswith("single_transformer_blocks.")})}
        # The file decides depth (and the guidance input), so a dev config folder also loads schnell.
        if variant == "chroma":
            return ChromaTransformer2DModel.from_single_file(
                converted, config=source, subfolder=config_subfolder(source, "transformer"), torch_dtype=dtype,
                local_files_only=local_only, **depth, **quantized(quantization_config))
        return FluxTransformer2DModel.from_single_file(
            converted, config=source, subfolder=config_subfolder(source, "transformer"), torch_dtype=dtype,
            local_files_only=local_only, guidance_embeds=variant in ("flux-dev", "flux-kontext"), **depth,
            **quantized(quantization_config))


def load_text_encoder_file(path: str | Path, kind: str, *, config_source: str, variant: str,
                           dtype: torch.dtype = torch.float32) -> Any:
    """CLIP-L (`kind="clip_l"`) or T5-XXL (`kind="t5"`) from a single HF-format file."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    source, local_only = _config_source(variant, config_source)
    # Chroma's pipeline has the T5 as text_encoder; FLUX has it as text_encoder_2.
    sub = "text_encoder" if kind == "clip_l" or variant == "chroma" else "text_encoder_2"
    config_cls, model_cls, marker = ((CLIPTextConfig, CLIPTextModel, "text_model.") if kind == "clip_l"
                                     else (T5Config, T5EncoderModel, "encoder."))
    try:
        config = config_cls.from_pretrained(source, subfolder=config_subfolder(source, sub) or "", local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _load_error(sub, source, exc) from exc
    state = strip_encoder_prefix(read_upcast(path, dtype), marker)
    if kind == "t5":
        tie_t5_embedding(state, Path(path).name)
    model = model_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model.eval()


def load_vae_file(path: str | Path, *, config_source: str, variant: str, dtype: torch.dtype = torch.float32) -> Any:
    """The FLUX AE from ae.safetensors (BFL/LDM names) with the pipeline's VAE config."""
    from diffusers import AutoencoderKL

    source, local_only = _config_source(variant, config_source)
    # A misfit is typically an SD/SDXL VAE (4 latent channels) where FLUX's 16-channel AE belongs.
    with fitting(Path(path).name, lambda exc: _load_error("vae", source, exc), "is not the FLUX autoencoder",
                 "Use ae.safetensors from the FLUX.1 release (models/vae/ae.safetensors), or give its path in the "
                 "vae setting."):
        # Read through read_upcast like the other parts, so an fp8 AE loads too.
        return AutoencoderKL.from_single_file(read_upcast(path, dtype), config=source, subfolder=config_subfolder(source, "vae"),
                                              torch_dtype=dtype, local_files_only=local_only)


def load_flux_single_file(transformer_file: str | Path, *, config_source: str = "", clip_l: str = "",
                          t5: str = "", vae: str = "", dtype: torch.dtype = torch.float32,
                          quantization_config: Any = None) -> FluxModel:
    """ComfyUI layout: the transformer file plus CLIP-L, T5-XXL and AE found next to it (or given)."""
    path = Path(transformer_file)
    if not path.is_file():
        raise ModelLoadError(f"The FLUX model file '{path}' does not exist.", "Check base_model.")
    variant = variant_from_keys(safetensors_keys(path))
    if variant is None:
        raise ModelLoadError(f"'{path.name}' is not a FLUX.1 or Chroma transformer.",
                             "Use the file from ComfyUI's models/diffusion_models (or models/unet).")
    root = comfy_models_root(path)
    # Find every part before reading any weights: a missing file fails in a second, not after minutes.
    clip_file = None if variant == "chroma" else find_part(root, "clip_l", clip_l)
    t5_file = find_part(root, "t5", t5)
    vae_file = find_part(root, "vae", vae)
    source, local_only = _config_source(variant, config_source)
    tokenizer, tokenizer_2 = _tokenizers(variant, source, local_only)
    transformer = load_transformer_file(path, config_source=source, dtype=dtype, variant=variant,
                                        quantization_config=quantization_config)
    text_encoder = None if clip_file is None else load_text_encoder_file(
        clip_file, "clip_l", config_source=source, variant=variant, dtype=dtype)
    t5_model = load_text_encoder_file(t5_file, "t5", config_source=source, variant=variant, dtype=dtype)
    vae_model = load_vae_file(vae_file, config_source=source, variant=variant, dtype=dtype)
    notes = [f"{name}: {p.name}" for name, p in (("CLIP-L", clip_file), ("T5", t5_file), ("AE", vae_file)) if p]
    if file_has_fp8(path):
        notes.append(fp8_note(path, dtype))
    return FluxModel(variant, transformer, vae_model, text_encoder, tokenizer, t5_model, tokenizer_2,
                     scheduler_config=_scheduler_config(source, local_only), source=str(path), is_single_file=True, notes=notes)
