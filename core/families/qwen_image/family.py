"""Qwen-Image and Qwen-Image-Edit behind the `ImageFamily` interface.

Built on the transformer families' default (core.families.dit.default) from `core.families.qwen_image.load`
(loading, latents), `.text` (prompts), `.loss`, `.single_file` and `.lora_files`: Qwen2.5-VL encodes every caption once
into a disk cache and is freed (it is 8.3 B parameters), sample prompts included; the video VAE's
latents are cached as moments and normalized by its per-channel mean / std; flow matching with the
pipeline's dynamic shift (or the configured sampling); LoRA on the attention and MLP Linears of the
60 blocks, then fp8 storage / gradient checkpointing / block offload; the LoRA written with
musubi-tuner's `lora_unet_` keys (ComfyUI, diffusers) and as `pytorch_lora_weights.safetensors`.
Edit trains on (control, target, caption): the control image goes to the VL encoder with the caption
and its latents are appended to the transformer's image tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.families.dit.common import first_text_encoder_file
from core.families.dit.default import (Draw, TransformerSpec, fixed_targets, flow_scheduler, kohya_writer, lazy,
                                       pipeline_generate, tryout_loader, sample_settings, transformer_family)
from core.families.qwen_image.load import (QwenModel, decode_latents, denormalize_latents, detect, encode_moments,
                                           normalize_latents)
from core.families.qwen_image.loss import make_loss, timestep_sampling
from core.family_api.contract import LoraFileFormat
from core.family_api.registry import family_info

VAE_SCALE = 8


# --- before loading ------------------------------------------------------------------------------

def describe(model: QwenModel) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    pairs = "; trains on (control, target, caption) pairs" if model.needs_control else ""
    if model.edit_plus:
        pairs = (f"; trains on targets with 1..{family_info(model.variant).max_references} reference images "
                 "and on plain images (text-to-image)")
    return [f"Model: {family_info(model.variant).label} ({layout}), flow matching{pairs}", *model.notes]


# --- prompts ---------------------------------------------------------------------------------------

def _vl_view(image: Image.Image, area: int) -> Image.Image:
    """A reference as the VL encoder sees it: resized to about `area` pixels, its aspect kept (the pipelines')."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(area, image.size[0] / image.size[1])
    return image.resize((width, height), Image.LANCZOS)


def _controls(model: QwenModel, keys: Sequence[Any]) -> tuple[list[str], list[Any] | None]:
    """Captions and, for Edit, the control images of prompt keys (a caption, or (caption, control path));
    Edit Plus: each key's reference images (caption, path, path ...), [] for a plain caption."""
    captions = [k[0] if isinstance(k, tuple) else k for k in keys]
    if not model.edits:
        return captions, None
    from core.data.image_io import load_rgb

    if model.edit_plus:
        from core.families.qwen_image.load import PLUS_CONDITION_AREA

        return captions, [[_vl_view(load_rgb(Path(p)), PLUS_CONDITION_AREA) for p in k[1:]]
                          if isinstance(k, tuple) else [] for k in keys]
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    images = []
    for key in keys:
        path = key[1] if isinstance(key, tuple) else None
        image = load_rgb(Path(path)) if path else Image.new("RGB", (64, 64), (0, 0, 0))
        # The Edit pipeline gives the VL encoder the control resized to about 1 megapixel, its aspect kept.
        width, height, _ = calculate_dimensions(1024 * 1024, image.size[0] / image.size[1])
        images.append(image.resize((width, height), Image.LANCZOS))
    return captions, images


def encode_entries(model: QwenModel, keys: list[Any], device: torch.device) -> list[dict[str, torch.Tensor]]:
    from core.families.qwen_image.text import encode_prompt_list

    captions, images = _controls(model, keys)
    return [{"prompt_embeds": e} for e in encode_prompt_list(model.text_encoder, model.tokenizer, captions,
                                                              variant=model.variant, processor=model.processor,
                                                              images=images)]


def _stack(entries: list[dict[str, torch.Tensor]]) -> Any:
    from core.families.qwen_image.text import stack_prompts

    return stack_prompts([e["prompt_embeds"] for e in entries])


def _identity(model: QwenModel) -> str:
    from core.families.dit.prompt_cache import encoder_identity

    return encoder_identity(model.text_encoder, settings=f"{model.variant}|512")


def _key_text(key: Any) -> str:
    """A prompt key's text in the cache: Edit's (caption, control path ...) keys with each image's path and time."""
    if isinstance(key, tuple):
        stamps = []
        for name in key[1:]:
            path = Path(name)
            stamps.append(f"{path.resolve()}|{path.stat().st_mtime_ns if path.exists() else 0}")
        return "\n".join([str(key[0]), *stamps])
    return str(key)


def _prompts(model: QwenModel, keys: list[Any], cfg: TrainConfig) -> list[Any]:
    """Captions (Edit: caption + control image), sample prompts and the negative prompt."""
    samples: list[Any] = list(cfg.sample_prompts) + [cfg.sample_negative_prompt or ""] if cfg.sample_prompts else []
    if model.edits:
        # Edit's previews edit the first pair's reference images: the sample prompts are encoded with them
        # (Edit Plus without any pair in the data: plain text-to-image previews).
        first = next((k[1:] for k in keys if isinstance(k, tuple)), ())
        model.preview_control = first[0] if first else None
        model.preview_references = list(first)
        if first:
            samples = [(p, *first) for p in samples]
        elif model.needs_control:
            samples = []
    return list(keys) + samples


# --- LoRA ------------------------------------------------------------------------------------------

def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> QwenModel:
    from core.families.qwen_image.load import load_qwen_model

    # A single transformer file: Qwen2.5-VL's file is the first of `text_encoder_files` (else found in models/).
    return load_qwen_model(cfg.base_model, config_source=cfg.base_model_config, vae=cfg.vae,
                           text_encoder=first_text_encoder_file(cfg), dtype=dtype,
                           quantization_config=quantization_config)


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: QwenModel, transformer: Any | None = None, *, edit: bool | None = None) -> Any:
    """QwenImageEditPipeline for an Edit model's previews (`edit`), QwenImageEditPlusPipeline for Edit Plus
    (2509 / 2511), else QwenImagePipeline."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    scheduler = flow_scheduler(model)
    parts = dict(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                 transformer=model.transformer if transformer is None else transformer)
    if model.edits if edit is None else edit:
        edit_class = QwenImageEditPlusPipeline if model.edit_plus else QwenImageEditPipeline
        pipe = edit_class(processor=model.processor, **parts)
    else:
        pipe = QwenImagePipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _whole_patches(pipe: Any, width: int, height: int) -> tuple[int, int]:
    step = pipe.vae_scale_factor * 2
    return max(step, width // step * step), max(step, height // step * step)


def _call_for(pipe: Any, draw: Draw, prompt: str, control: Any = None) -> dict[str, Any]:
    """`guidance` is the pipelines' true CFG scale (off at <= 1). Edit (QwenImageEditPipeline): `control`
    (a PIL image; Edit Plus: a list of them) is the image to edit; `embeds` then must be the prompts' encodings
    with that image (or None: the pipeline's VL encoder encodes them)."""
    cfg_on = draw.guidance > 1.0
    kwargs = draw.latents(true_cfg_scale=draw.guidance)
    if control is not None:
        kwargs["image"] = control
    if draw.embeds is None:
        kwargs["prompt"] = prompt
        if cfg_on:
            kwargs["negative_prompt"] = draw.negative_prompt or " "
    else:
        e = draw.encoded(prompt)
        kwargs.update(prompt_embeds=e.embeds, prompt_embeds_mask=e.mask)
        if cfg_on:
            n = draw.encoded(draw.negative_prompt or "")
            kwargs.update(negative_prompt_embeds=n.embeds, negative_prompt_embeds_mask=n.mask)
    return kwargs


def _decode(pipe: Any, packed: torch.Tensor, draw: Draw) -> list[Image.Image]:
    from core.families.dit.flow import unpack_latents

    step = pipe.vae_scale_factor * 2
    return decode_latents(pipe.vae, unpack_latents(packed.float(), 2 * (draw.height // step), 2 * (draw.width // step)))


_draw = pipeline_generate(_call_for, _decode, fit_size=_whole_patches)


def generate(pipe: Any, prompts: Sequence[str], *, control: Any = None, **settings: Any) -> list[Image.Image]:
    """The pipeline's images; `control`: the reference images (a list; one-image Edit takes the first). An Edit
    pipeline given none draws from text alone (QwenImagePipeline over the same modules: the Test tab)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    if isinstance(pipe, QwenImageEditPipeline) and isinstance(control, (list, tuple)):
        control = control[0] if control else None
    if isinstance(pipe, (QwenImageEditPipeline, QwenImageEditPlusPipeline)) and not control:
        pipe = QwenImagePipeline(**{k: v for k, v in pipe.components.items() if k != "processor"})
        pipe.set_progress_bar_config(disable=True)
        control = None
    return _draw(pipe, prompts, control=control, **settings)


def preview_size(model: QwenModel, resolution: int) -> tuple[int, int]:
    floor = family_info(model.variant).sample_size_floor
    step = VAE_SCALE * 2
    side = max(step, max(resolution, floor) // step * step)
    return side, side


def previews(model: QwenModel, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    """Previews with the transformer being trained, from the cached prompt encodings. Edit: each sample
    prompt applied to the first pair's control image (encoded with it before the VL encoder left)."""
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    control, embeds = None, cached
    references = model.preview_references
    if model.needs_control:
        if not model.preview_control or cached is None:
            return []
        from core.data.image_io import load_rgb

        control = load_rgb(Path(model.preview_control))
        embeds = lambda prompts: cached([(p, model.preview_control) for p in prompts])  # noqa: E731
    elif model.edit_plus:
        if cached is None:
            return []
        if references:
            from core.data.image_io import load_rgb

            control = [load_rgb(Path(p)) for p in references]
            embeds = lambda prompts: cached([(p, *references) for p in prompts])  # noqa: E731
        else:
            pipe = build_pipeline(model, transformer, edit=False)  # no pair in the data: text-to-image previews
    return generate(pipe, cfg.sample_prompts, **sample_settings(cfg), width=width, height=height, embeds=embeds,
                    dtype=dtype, control=control)


# An Edit model edits the Test tab's uploaded reference images; without any it draws from text (`generate`).
tryout_pipeline = tryout_loader("core.families.qwen_image.load", build_pipeline, "load_qwen_model")


def default_size(model: QwenModel) -> int:
    return family_info(model.variant).native_resolution


# --- LoRA files for the tools ------------------------------------------------------------------------

def _to_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any form of a Qwen-Image LoRA file -> kohya tensors (`lora_unet_<module>`; alphas from the
    diffusers file's adapter metadata where it has them)."""
    from core.families.qwen_image.lora_files import peft_to_kohya, read_lora

    peft, alphas, _ = read_lora(path)
    return peft_to_kohya(peft, alpha=alphas)


def _modules_to_peft(modules: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The tools' LoraModules (kohya names) -> the diffusers-named PEFT state and alpha per module."""
    from core.families.qwen_image.lora_files import kohya_to_peft
    from core.families.dit.tools_format import modules_to_peft

    return modules_to_peft(modules, "Qwen-Image", kohya_to_peft)


def _write_kohya(modules: dict[str, Any], path: str | Path, *, variant: str = "qwen-image",
                 metadata: dict[str, str] | None = None, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    from core.families.qwen_image.lora_files import write_kohya_file

    peft, alphas = _modules_to_peft(modules)
    kept = {k: v for k, v in (metadata or {}).items()
            if k.startswith(("ss_", "modelspec.")) and not k.startswith("sshs_")}
    from core.families.qwen_image.load import VARIANTS

    variant = variant if variant in VARIANTS else "qwen-image"
    return write_kohya_file(peft, path, variant=variant, alpha=alphas, metadata=kept, dtype=dtype)


def _write_diffusers(modules: dict[str, Any], folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    from core.families.dit.tools_format import lora_config_of
    from core.families.qwen_image.lora_files import write_diffusers_file

    peft, alphas = _modules_to_peft(modules)
    return write_diffusers_file(peft, folder, lora_config=lora_config_of(peft, alphas), dtype=dtype)


def _to_peft(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    from core.families.qwen_image.lora_files import read_lora

    peft, alphas, _ = read_lora(path)
    return peft, alphas


LORA_FILES = LoraFileFormat(to_kohya=_to_kohya, write_kohya=_write_kohya, write_diffusers=_write_diffusers,
                            to_peft=_to_peft)


_FILES = "core.families.qwen_image.lora_files"

SPEC = TransformerSpec(
    label="Qwen-Image", trains="Qwen-Image trains the attention and MLP layers of every block",
    encoders_note="Qwen-Image always caches the text encoder's outputs (Qwen2.5-VL-7B is too large to keep).",
    load=load, lora_targets=fixed_targets("core.families.qwen_image.load", "lora_targets"), make_loss=make_loss,
    read_lora=lazy(_FILES, "read_lora"), write_kohya=kohya_writer(_FILES, "write_kohya_file"),
    write_diffusers=lazy(_FILES, "write_diffusers_file"), encode_entries=encode_entries, stack=_stack,
    prompt_identity=_identity, key_text=_key_text, prompts=_prompts, lora_init=True,
    training_note=lambda model, cfg: f"{timestep_sampling(cfg)} timestep sampling",
    # The modulation Linears too (img_mod / txt_mod: 6.8 B of the 20.4 B), as musubi-tuner's fp8_base.
    fp8_cast_modulation=True)

FAMILY = transformer_family(
    SPEC, describe=describe, previews=previews, tryout_pipeline=tryout_pipeline, generate=generate,
    default_size=default_size, detect=detect, encode_moments=encode_moments, normalize_latents=normalize_latents,
    denormalize_latents=denormalize_latents, lora_files=LORA_FILES)
