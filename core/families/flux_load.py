"""Detect and load FLUX.1 (dev / schnell) and Chroma as users have them.

Two layouts: a diffusers folder or hub id (FluxPipeline / ChromaPipeline components),
or ComfyUI's: a BFL transformer file under `models/diffusion_models` (or `models/unet`)
with CLIP-L and T5-XXL under `models/text_encoders` (or `models/clip`) and the AE under
`models/vae`. Single files carry no configs or tokenizers, so they come from a diffusers
config folder (`config_source`, the project's `base_model_config`), weights not needed.
fp8 files (`float8_e4m3fn`, also ComfyUI's "scaled fp8") are upcast to the compute dtype.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from core.families.flux_convert import BFL_PREFIXES, bfl_to_diffusers, strip_prefix
from core.models.sd_single_file import ModelLoadError

VARIANTS = ("flux-dev", "flux-schnell", "chroma")
# Where configs + tokenizers come from when a single file is given without config_source.
HUB_CONFIGS = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell",
               "chroma": "lodestones/Chroma1-HD"}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class FluxModel:
    """The modules of a FLUX-family pipeline plus what training needs to know about them.

    For Chroma `text_encoder`/`tokenizer` are None (it has no CLIP): the T5 is always
    `text_encoder_2`/`tokenizer_2`, so the encode code does not branch on names.
    """

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any | None
    text_encoder_2: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    source: str
    is_single_file: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def has_guidance(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# --- detection ---------------------------------------------------------------------------------


def variant_from_keys(keys: Iterable[str]) -> str | None:
    """`flux-dev` / `flux-schnell` / `chroma` from tensor names (BFL or diffusers), None if not FLUX."""
    names = set(strip_prefix(dict.fromkeys(keys)))
    bfl = any(k.startswith("double_blocks.") and ".img_attn.qkv." in k for k in names)
    diff = any(k.startswith("transformer_blocks.") and ".attn.add_q_proj." in k for k in names) and any(
        k.startswith("single_transformer_blocks.") for k in names)
    if not (bfl or diff):
        return None
    if any(k.startswith("distilled_guidance_layer.") for k in names):
        # Chroma replaced FLUX's modulation MLPs by one "approximator" and dropped the guidance input.
        return "chroma"
    if any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in names):
        return "flux-dev"
    return "flux-schnell"


def safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of a .safetensors file (the header only: no tensor is read)."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"'{Path(path).name}' is not a readable .safetensors file: {exc}",
                             "The file is damaged or incomplete: download it again.") from exc


def variant_from_folder_configs(index: dict[str, Any] | None, transformer_config: dict[str, Any]) -> str | None:
    """The variant from a diffusers folder's model_index.json and transformer/config.json."""
    names = " ".join(str(d.get("_class_name", "")) for d in (index or {}, transformer_config))
    if "Chroma" in names:
        return "chroma"
    if "Flux" not in names:
        return None
    return "flux-dev" if transformer_config.get("guidance_embeds") else "flux-schnell"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def detect_variant(source: str | Path) -> str | None:
    """The FLUX variant of a single file or diffusers folder (None when it is not a FLUX model)."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return None
        return variant_from_keys(safetensors_keys(path))
    if path.is_dir():
        index = _read_json(path / "model_index.json")
        transformer = _read_json(path / "transformer" / "config.json") or _read_json(path / "config.json") or {}
        return variant_from_folder_configs(index, transformer)
    return None


def file_has_fp8(path: str | Path) -> bool:
    """True when any tensor of the file is stored as float8 (reads the header only)."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), "pt") as handle:
        return any(handle.get_slice(k).get_dtype().startswith("F8") for k in handle.keys())


# --- reading weights ---------------------------------------------------------------------------


def read_upcast(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; fp8 ones upcast to `dtype`, scaled-fp8 ones rescaled.

    ComfyUI's "scaled fp8" files store `<layer>.scale_weight` next to each fp8 weight: the
    real weight is fp8 * scale. Their bookkeeping tensors (`scaled_fp8`, `scale_input`) go.
    """
    from safetensors import safe_open  # noqa: PLC0415

    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if key.endswith(".scale_weight"):
                scales[key[: -len(".scale_weight")] + ".weight"] = tensor
            elif key.endswith(".scale_input") or key.split(".")[-1] == "scaled_fp8":
                continue
            else:
                out[key] = tensor.to(dtype) if tensor.dtype in FP8_DTYPES else tensor
    for key, scale in scales.items():
        if key in out:
            out[key] = (out[key].to(torch.float32) * scale.to(torch.float32)).to(dtype)
    return out


# --- the ComfyUI layout --------------------------------------------------------------------------

# Where ComfyUI keeps each part, and the words its usual file names contain.
PART_FOLDERS = {"clip_l": ("text_encoders", "clip"), "t5": ("text_encoders", "clip"), "vae": ("vae",)}
PART_WORDS = {"clip_l": ("clip_l", "clip-l", "clipl"), "t5": ("t5xxl", "t5-xxl", "t5_xxl", "t5"),
              "vae": ("ae.", "flux_vae", "flux-vae", "ae_", "vae")}
PART_HINTS = {"clip_l": "clip_l.safetensors (CLIP-L)", "t5": "t5xxl_fp16.safetensors (T5-XXL; fp8 works too)",
              "vae": "ae.safetensors (the FLUX autoencoder)"}


def comfy_models_root(transformer_file: str | Path) -> Path | None:
    """ComfyUI's `models/` folder when the file sits in models/diffusion_models or models/unet."""
    parent = Path(transformer_file).resolve().parent
    for folder in [parent, *parent.parents][:3]:
        if folder.name in ("diffusion_models", "unet"):
            return folder.parent
    return None


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


# --- loading ---------------------------------------------------------------------------------------


def _config_source(variant: str, config_source: str) -> tuple[str, bool]:
    source = config_source or HUB_CONFIGS[variant]
    return source, Path(source).is_dir() or _offline()


def _sub(source: str, name: str) -> str | None:
    # A config folder may be a whole pipeline (with transformer/) or the component folder itself.
    path = Path(source)
    if path.is_dir() and not (path / name).is_dir() and (path / "config.json").is_file():
        return None
    return name


def _load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"The {what} config could not be loaded from '{source}'{' (offline)' if _offline() else ''}: {exc}",
        "A single-file FLUX needs base_model_config: a diffusers FLUX folder (model_index.json, transformer/, "
        "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, vae/ configs; the weights are not needed), "
        "or a hub id downloaded once with internet access.")


def load_transformer_file(path: str | Path, *, config_source: str = "", dtype: torch.dtype = torch.float32,
                          variant: str | None = None, quantization_config: Any = None) -> Any:
    """A FLUX.1 / Chroma transformer from a BFL single file (any prefix, fp8 upcast to `dtype`).

    `quantization_config` (e.g. `flux_memory.nf4_config()`) quantizes it while loading.
    """
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel  # noqa: PLC0415

    quant = {"quantization_config": quantization_config} if quantization_config is not None else {}
    variant = variant or variant_from_keys(safetensors_keys(path))
    if variant is None:
        raise ModelLoadError(f"'{Path(path).name}' is not a FLUX.1 or Chroma transformer.",
                             "Use the transformer file from models/diffusion_models (flux1-dev.safetensors etc.).")
    source, local_only = _config_source(variant, config_source)
    state = read_upcast(path, dtype)
    if any(k.startswith(BFL_PREFIXES) for k in state):
        # An all-in-one checkpoint also holds the VAE and text encoders: keep the diffusion model only.
        state = {k: v for k, v in state.items() if k.startswith(BFL_PREFIXES)}
    try:
        # Diffusers-named single files load as they are; BFL names are converted first.
        converted = bfl_to_diffusers(state) if any("double_blocks." in k for k in state) else state
        del state
        depth = {"num_layers": len({int(k.split(".")[1]) for k in converted if k.startswith("transformer_blocks.")}),
                 "num_single_layers": len({int(k.split(".")[1]) for k in converted
                                           if k.startswith("single_transformer_blocks.")})}
        # The file decides depth (and the guidance input), so a dev config folder also loads schnell.
        if variant == "chroma":
            return ChromaTransformer2DModel.from_single_file(
                converted, config=source, subfolder=_sub(source, "transformer"), torch_dtype=dtype,
                local_files_only=local_only, **depth, **quant)
        return FluxTransformer2DModel.from_single_file(
            converted, config=source, subfolder=_sub(source, "transformer"), torch_dtype=dtype,
            local_files_only=local_only, guidance_embeds=variant == "flux-dev", **depth, **quant)
    except OSError as exc:
        raise _load_error("transformer", source, exc) from exc
    except (KeyError, ValueError, RuntimeError) as exc:
        # Unknown tensors or shapes that do not fit the config: a damaged file or another model's config.
        raise ModelLoadError(f"'{Path(path).name}' does not fit the {variant} config from '{source}': {exc}",
                             "Check that base_model_config is a diffusers folder of the same model, and that "
                             "the file is a complete FLUX transformer.") from exc


def _strip_encoder_prefix(state: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor]:
    # Some packs prefix text-encoder keys (e.g. "text_encoders.clip_l.transformer."): cut up to the marker.
    first = next((k for k in state if marker in k), None)
    if first is None or first.startswith(marker):
        return state
    cut = first.index(marker)
    return {k[cut:]: v for k, v in state.items() if len(k) > cut}


def load_text_encoder_file(path: str | Path, kind: str, *, config_source: str, variant: str,
                           dtype: torch.dtype = torch.float32) -> Any:
    """CLIP-L (`kind="clip_l"`) or T5-XXL (`kind="t5"`) from a single HF-format file."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: PLC0415

    source, local_only = _config_source(variant, config_source)
    # Chroma's pipeline has the T5 as text_encoder; FLUX has it as text_encoder_2.
    sub = "text_encoder" if kind == "clip_l" or variant == "chroma" else "text_encoder_2"
    config_cls, model_cls, marker = ((CLIPTextConfig, CLIPTextModel, "text_model.") if kind == "clip_l"
                                     else (T5Config, T5EncoderModel, "encoder."))
    try:
        config = config_cls.from_pretrained(source, subfolder=_sub(source, sub) or "", local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _load_error(sub, source, exc) from exc
    state = _strip_encoder_prefix(read_upcast(path, dtype), marker)
    if kind == "t5":
        # T5 ties the input embedding; files keep one of the two names.
        shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        if shared is None:
            raise ModelLoadError(f"'{Path(path).name}' has no T5 token embedding (shared.weight).",
                                 "Use an HF-format T5-XXL encoder file such as t5xxl_fp16.safetensors.")
        state.setdefault("shared.weight", shared)
        state.setdefault("encoder.embed_tokens.weight", shared)
    model = model_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model.eval()


def load_vae_file(path: str | Path, *, config_source: str, variant: str, dtype: torch.dtype = torch.float32) -> Any:
    """The FLUX AE from ae.safetensors (BFL/LDM names) with the pipeline's VAE config."""
    from diffusers import AutoencoderKL  # noqa: PLC0415

    source, local_only = _config_source(variant, config_source)
    try:
        return AutoencoderKL.from_single_file(str(path), config=source, subfolder=_sub(source, "vae"),
                                              torch_dtype=dtype, local_files_only=local_only)
    except OSError as exc:
        raise _load_error("vae", source, exc) from exc
    except (KeyError, ValueError, RuntimeError) as exc:
        # Typically an SD/SDXL VAE (4 latent channels) where FLUX's 16-channel AE belongs.
        raise ModelLoadError(f"'{Path(path).name}' is not the FLUX autoencoder: {exc}",
                             "Use ae.safetensors from the FLUX.1 release (models/vae/ae.safetensors), or give "
                             "its path in the vae setting.") from exc


def _tokenizers(variant: str, source: str, local_only: bool) -> tuple[Any | None, Any]:
    from transformers import AutoTokenizer, CLIPTokenizer  # noqa: PLC0415

    try:
        if variant == "chroma":
            return None, AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
        return (CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only),
                AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", local_files_only=local_only))
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", source, exc) from exc


def _scheduler_config(source: str, local_only: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler",
                                                                local_files_only=local_only))
    except (OSError, ValueError):
        # Only sampling uses it; FLUX.1-dev's values are a safe default.
        return {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096}


def load_flux_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None
                     ) -> FluxModel:
    """A FLUX.1 / Chroma diffusers folder or hub id, component by component, eval mode, on the CPU."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, DiffusionPipeline, FluxTransformer2DModel  # noqa: PLC0415
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: PLC0415

    local_only = Path(source).is_dir() or _offline()
    kw = {"local_files_only": local_only}
    try:
        index = dict(DiffusionPipeline.load_config(source, **kw))
        t_config = dict(FluxTransformer2DModel.load_config(source, subfolder="transformer", **kw))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{source}' is not a loadable FLUX diffusers folder or hub id: {exc}",
                             "A diffusers FLUX folder has model_index.json and transformer/, vae/, text_encoder/, "
                             "tokenizer/, text_encoder_2/, tokenizer_2/ and scheduler/.") from exc
    variant = variant_from_folder_configs(index, t_config)
    if variant is None:
        raise ModelLoadError(f"'{source}' is a {index.get('_class_name', 'diffusers')} folder, not FLUX or Chroma.",
                             "Choose the family that matches the model.")
    quant = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        if variant == "chroma":
            transformer = ChromaTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype,
                                                                   **kw, **quant)
            text_encoder, t5 = None, T5EncoderModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw)
        else:
            transformer = FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype,
                                                                 **kw, **quant)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw).eval()
            t5 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"A part of '{source}' could not be loaded: {exc}",
                             "The folder is incomplete: download the model again.") from exc
    tokenizer, tokenizer_2 = _tokenizers(variant, source, local_only)
    return FluxModel(variant, transformer, vae, text_encoder, tokenizer, t5.eval(), tokenizer_2,
                     _scheduler_config(source, local_only), str(source))


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
        notes.append(f"{path.name} is fp8: weights upcast to {str(dtype).replace('torch.', '')} for training.")
    return FluxModel(variant, transformer, vae_model, text_encoder, tokenizer, t5_model, tokenizer_2,
                     _scheduler_config(source, local_only), str(path), is_single_file=True, notes=notes)


def load_flux_model(base_model: str, *, config_source: str = "", clip_l: str = "", t5: str = "", vae: str = "",
                    dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> FluxModel:
    """Any FLUX / Chroma source: a single .safetensors (ComfyUI layout), a diffusers folder or a hub id."""
    if Path(base_model).is_file():
        return load_flux_single_file(base_model, config_source=config_source, clip_l=clip_l, t5=t5, vae=vae,
                                     dtype=dtype, quantization_config=quantization_config)
    if base_model.lower().endswith(".safetensors"):
        raise ModelLoadError(f"The FLUX model file '{base_model}' does not exist.", "Check base_model.")
    return load_flux_folder(base_model, dtype=dtype, quantization_config=quantization_config)
