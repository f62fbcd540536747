"""Detect and load Stable Diffusion 3 / 3.5 (medium, large) as users have them.

Layouts: a diffusers folder or hub id (StableDiffusion3Pipeline components; T5 optional), or ComfyUI's
single files: SAI's all-in-one `sd3.5_medium.safetensors` (MMDiT under `model.diffusion_model.`, the
text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`, the VAE under
`first_stage_model.`), or the MMDiT alone (models/diffusion_models, fp8 included) with clip_l / clip_g /
t5xxl in models/text_encoders (or models/clip) and the VAE in models/vae, found there or given.
Which model it is follows sd-scripts' rule (library/sd3_utils): no qk norm -> SD3 medium ("medium"),
qk norm with dual-attention blocks -> SD3.5 medium ("5-medium"), qk norm without -> SD3.5 large ("5-large").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import torch

from core.families.dit.folders import config_error, loading_parts, not_this_family, quantized, read_pipeline_configs
from core.hub import offline
from core.families.dit.default import LoadedModel
from core.families.dit.weights import model_folder_on_meta, read_json, safetensors_keys
from core.families.sd3.keys import SINGLE_FILE_MARKERS
from core.family_api.contract import ModelLoadError

HUB_CONFIGS = {"5-medium": "stabilityai/stable-diffusion-3.5-medium",
               "medium": "stabilityai/stable-diffusion-3-medium-diffusers",
               "5-large": "stabilityai/stable-diffusion-3.5-large"}
CLASS_NAMES = ("StableDiffusion3Pipeline", "SD3Transformer2DModel")
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's and sd-scripts' default T5 tokens for SD3
PART_FOLDERS = {"clip_l": ("text_encoders", "clip"), "clip_g": ("text_encoders", "clip"),
                "t5": ("text_encoders", "clip"), "vae": ("vae",)}
PART_WORDS = {"clip_l": ("clip_l", "clip-l", "clipl"), "clip_g": ("clip_g", "clip-g", "clipg"),
              "t5": ("t5xxl", "t5-xxl", "t5_xxl"), "vae": ("sd3", "sd35", "sd3.5", "vae")}
EMBEDDED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
            "t5": "text_encoders.t5xxl.transformer.", "vae": "first_stage_model."}


def variant_of(model_type: str) -> str:
    """The registry family of a model type: SD3.5 large has its own row, both mediums share "sd3"."""
    return "sd35-large" if model_type == "5-large" else "sd3"


@dataclass
class SD3Model(LoadedModel):
    """The modules of an SD3 pipeline and what training needs to know about them. T5 may be None."""

    model_type: str               # "medium" (SD3), "5-medium", "5-large" (sd-scripts' names)
    transformer: Any
    vae: Any
    text_encoder: Any             # CLIP-L with projection
    tokenizer: Any
    text_encoder_2: Any           # CLIP-G with projection
    tokenizer_2: Any
    text_encoder_3: Any | None    # T5-XXL, optional
    tokenizer_3: Any | None

    @property
    def variant(self) -> str:
        return variant_of(self.model_type)


# --- detection ---------------------------------------------------------------------------------


def model_type_from_keys(keys: Iterable[str]) -> str | None:
    """"medium" / "5-medium" / "5-large" from MMDiT tensor names (any prefix); None if not an MMDiT."""
    names = list(keys)
    if not any(k.endswith(m) for k in names for m in SINGLE_FILE_MARKERS):
        return None
    if not any(".context_block.attn.ln_k." in k for k in names):
        return "medium"
    return "5-medium" if any(".x_block.attn2." in k for k in names) else "5-large"


def model_type_from_config(config: dict[str, Any]) -> str:
    if not config.get("qk_norm"):
        return "medium"
    return "5-medium" if config.get("dual_attention_layers") else "5-large"


def model_type_from_folder(index: dict[str, Any] | None, transformer: dict[str, Any]) -> str | None:
    names = " ".join(str(d.get("_class_name", "")) for d in (index or {}, transformer))
    if not any(c in names for c in CLASS_NAMES):
        return None
    return model_type_from_config(transformer)


def detect_model_type(source: str | Path) -> str | None:
    """The SD3 model type of a single file, diffusers folder or (cached) hub id; None when not SD3."""
    path = Path(source)
    if path.is_file():
        return model_type_from_keys(safetensors_keys(path)) if path.suffix.lower() == ".safetensors" else None
    if path.is_dir():
        transformer = read_json(path / "transformer" / "config.json") or read_json(path / "config.json") or {}
        return model_type_from_folder(read_json(path / "model_index.json"), transformer)
    if str(source).lower().endswith(".safetensors") or "/" not in str(source):
        return None
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(str(source), local_files_only=offline()))
        if "StableDiffusion3" not in str(index.get("_class_name", "")):
            return None
        transformer = dict(DiffusionPipeline.load_config(str(source), subfolder="transformer",
                                                         local_files_only=offline()))
    except Exception:  # noqa: BLE001 - not a reachable SD3 pipeline: another family's loader reports it
        return None
    return model_type_from_folder(index, transformer)


def detect(base_model: str) -> str | None:
    """The registry family ("sd3" / "sd35-large") of `base_model`, else None."""
    model_type = detect_model_type(base_model)
    return None if model_type is None else variant_of(model_type)


# --- diffusers folders -------------------------------------------------------------------------


def _scheduler_config(source: str, local_only: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler",
                                                                local_files_only=local_only))
    except (OSError, ValueError):
        return {"num_train_timesteps": 1000, "shift": 3.0}  # SD3 / SD3.5's scheduler


def _tokenizers(source: str, local_only: bool, with_t5: bool = True) -> tuple[Any, Any, Any | None]:
    from transformers import AutoTokenizer, CLIPTokenizer

    kw = {"local_files_only": local_only}
    try:
        t5 = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3", **kw) if with_t5 else None
        return (CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
                CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw), t5)
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", source, exc) from exc


def _load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    return config_error("SD3", what, source, exc,
        "A single-file SD3 needs base_model_config: a diffusers SD3 / SD3.5 folder of the same model (its "
        "configs and tokenizers; the weights are not needed), or a hub id downloaded once with internet access.")


def load_sd3_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                    defer_transformer: bool = False) -> SD3Model:
    """An SD3 / SD3.5 diffusers folder or hub id, component by component, eval mode, on the CPU.
    `defer_transformer`: the transformer is left for `SD3Model.load_network` (training loads it last)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    index, t_config, kw = read_pipeline_configs(
        source, SD3Transformer2DModel, "SD3", "A diffusers SD3 folder has model_index.json and transformer/, vae/, "
        "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ (text_encoder_3/ and tokenizer_3/ for T5) and "
        "scheduler/.")
    local_only = kw["local_files_only"]
    model_type = model_type_from_folder(index, t_config)
    if model_type is None:
        raise not_this_family(source, index, "SD3")
    with_t5 = bool((index.get("text_encoder_3") or [None])[0])

    def load_transformer() -> Any:
        with loading_parts(source):
            if quantization_config is None and Path(source, "transformer").is_dir():
                model = model_folder_on_meta(SD3Transformer2DModel, Path(source, "transformer"), dtype)
                if model is not None:  # without computing SD3.5's 0.9 GB position table first
                    return model
            return SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **kw,
                                                         **quantized(quantization_config))

    transformer = None if defer_transformer else load_transformer()
    with loading_parts(source):
        clip_l = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw)
        clip_g = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype, **kw)
        t5 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", dtype=dtype, **kw) if with_t5 else None
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    tok_l, tok_g, tok_t5 = _tokenizers(source, local_only, with_t5)
    notes = [] if with_t5 else ["No T5 in this pipeline: its part of the prompt encoding is zeros (as diffusers)."]
    return SD3Model(model_type, transformer, vae, clip_l.eval(), tok_l, clip_g.eval(), tok_g,
                    None if t5 is None else t5.eval(), tok_t5,
                    scheduler_config=_scheduler_config(source, local_only), source=str(source),
                    notes=notes, network_loader=load_transformer if defer_transformer else None)


def text_encoder_parts(files: str) -> dict[str, str]:
    """`text_encoder_files` ("a/clip_l.safetensors, b/clip_g.safetensors, ...") -> {part: path}, by file name."""
    out: dict[str, str] = {}
    for item in (f.strip() for f in files.split(",") if f.strip()):
        name = Path(item).name.lower()
        part = next((p for p in ("clip_l", "clip_g", "t5") if any(w in name for w in PART_WORDS[p])), None)
        if part is None:
            raise ModelLoadError(f"'{Path(item).name}' in text_encoder_files is not named as CLIP-L, CLIP-G or T5-XXL.",
                                 "Keep the usual names (clip_l..., clip_g..., t5xxl...), one file per encoder.")
        if part in out:
            raise ModelLoadError(f"text_encoder_files names two {part} files.", "Give one file per text encoder.")
        out[part] = item
    return out


def load_sd3_model(base_model: str, *, config_source: str = "", vae: str = "", text_encoder_files: str = "",
                   dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                   defer_transformer: bool = False) -> SD3Model:
    """Any SD3 source: a single .safetensors (ComfyUI layouts), a diffusers folder or a hub id."""
    from core.families.sd3.single_file import load_sd3_single_file, load_sd3_single_file_vae

    if Path(base_model).is_file():
        return load_sd3_single_file(base_model, config_source=config_source, vae=vae, dtype=dtype,
                                    quantization_config=quantization_config, **text_encoder_parts(text_encoder_files))
    if base_model.lower().endswith(".safetensors"):
        raise ModelLoadError(f"The SD3 model file '{base_model}' does not exist.", "Check base_model.")
    model = load_sd3_folder(base_model, dtype=dtype, quantization_config=quantization_config,
                            defer_transformer=defer_transformer)
    if vae:
        model.vae = load_sd3_single_file_vae(vae, config_source=base_model, dtype=dtype)
        model.notes.append(f"VAE from {vae}")
    return model
