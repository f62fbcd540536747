"""Qwen-Image and Qwen-Image-Edit behind the `ImageFamily` interface.

Built from `core.families.qwen_image.load` (loading, prompts, latents, loss) and
`core.families.qwen_image.lora_files` (single files, LoRA files): Qwen2.5-VL encodes every caption once
into a disk cache and is freed (it is 8.3 B parameters), sample prompts included; the video VAE's
latents are cached as moments and normalized by its per-channel mean / std; flow matching with the
pipeline's dynamic shift (or the configured sampling); LoRA on the attention and MLP Linears of the
60 blocks, then fp8 storage / gradient checkpointing / block offload; the LoRA written with
musubi-tuner's `lora_unet_` keys (ComfyUI, diffusers) and as `pytorch_lora_weights.safetensors`.
Edit trains on (control, target, caption): the control image goes to the VL encoder with the caption
and its latents are appended to the transformer's image tokens.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.family_api.contract import Adapted, Batch, ImageFamily, LoraFileFormat, Log, RunFacts
from core.families.qwen_image.load import (QwenBatch, QwenModel, decode_latents, denormalize_latents, detect,
                                      encode_moments, normalize_latents)
from core.families.dit.common import (check_transformer, config_from_lora_file, first_text_encoder_file,
                                                load_dtype_and_quantization)
from core.family_api.registry import family_info

VAE_SCALE = 8


def timestep_sampling(cfg: TrainConfig) -> str:
    """auto: the pipeline's dynamic shift at each batch's size; otherwise the configured method."""
    return "dynamic" if cfg.timestep_sampling == "auto" else cfg.timestep_sampling


# --- before loading ------------------------------------------------------------------------------

def check(cfg: TrainConfig) -> list[str]:
    return check_transformer(
        cfg, "Qwen-Image", targets="Qwen-Image trains the attention and MLP layers of every block",
        ignored_for="only apply to SD models; ignored for Qwen-Image.",
        encoders="Qwen-Image always caches the text encoder's outputs (Qwen2.5-VL-7B is too large to keep).")


def load(cfg: TrainConfig) -> QwenModel:
    from core.families.qwen_image.load import load_qwen_model

    dtype, quant = load_dtype_and_quantization(cfg)
    # A single transformer file: Qwen2.5-VL's file is the first of `text_encoder_files` (else found in models/).
    return load_qwen_model(cfg.base_model, config_source=cfg.base_model_config, vae=cfg.vae,
                           text_encoder=first_text_encoder_file(cfg), dtype=dtype, quantization_config=quant)


def describe(model: QwenModel) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    pairs = "; trains on (control, target, caption) pairs" if model.needs_control else ""
    return [f"Model: {family_info(model.variant).label} ({layout}), flow matching{pairs}", *model.notes]


def _encoders(model: QwenModel) -> list[Any]:
    return [model.text_encoder] if model.text_encoder is not None else []


# --- prompts ---------------------------------------------------------------------------------------

def _controls(model: QwenModel, keys: Sequence[Any]) -> tuple[list[str], list[Any] | None]:
    """Captions and, for Edit, the control images of prompt keys (a caption, or (caption, control path))."""
    captions = [k[0] if isinstance(k, tuple) else k for k in keys]
    if not model.needs_control:
        return captions, None
    from core.data.image_io import load_rgb

    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    images = []
    for key in keys:
        path = key[1] if isinstance(key, tuple) else None
        image = load_rgb(Path(path)) if path else Image.new("RGB", (64, 64), (0, 0, 0))
        # The Edit pipeline gives the VL encoder the control resized to about 1 megapixel, its aspect kept.
        width, height, _ = calculate_dimensions(1024 * 1024, image.size[0] / image.size[1])
        images.append(image.resize((width, height), Image.LANCZOS))
    return captions, images


def encode_prompts(model: QwenModel, keys: list[Any], device: torch.device) -> Any:
    from core.families.qwen_image.load import encode_prompt_list, stack_prompts

    captions, images = _controls(model, keys)
    return stack_prompts(encode_prompt_list(model.text_encoder, model.tokenizer, captions, variant=model.variant,
                                            processor=model.processor, images=images))


def _identity(model: QwenModel) -> str:
    from core.families.flux.text import encoder_identity

    return encoder_identity(model.text_encoder, max_sequence_length=512, variant=model.variant)


def _key_text(key: Any) -> str:
    if isinstance(key, tuple):
        path = Path(key[1])
        stamp = path.stat().st_mtime_ns if path.exists() else 0
        return f"{key[0]}\n{path.resolve()}|{stamp}"
    return str(key)


def cache_prompts(model: QwenModel, keys: list[Any], cfg: TrainConfig, device: torch.device,
                  log: Log) -> Callable[[list[Any]], Any]:
    """Captions (Edit: caption + control image), sample prompts and the negative prompt encoded once, on disk."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.atomic import atomic_path
    from core.families.qwen_image.load import encode_prompt_list, stack_prompts
    from core.train.latent_cache import cache_root_for

    samples: list[Any] = list(cfg.sample_prompts) + [cfg.sample_negative_prompt or ""] if cfg.sample_prompts else []
    if model.needs_control:
        # Edit's previews edit the first pair's control image: the sample prompts are encoded with it.
        model.preview_control = next((k[1] for k in keys if isinstance(k, tuple)), None)
        samples = [(p, model.preview_control) for p in samples] if model.preview_control else []
    prompts = list(keys) + samples
    folder = None
    if cfg.cache_latents_to_disk:
        folder = Path(cache_root_for(cfg.train_data_dir, cfg.output_dir, "text")) / _identity(model)
    entries: dict[Any, torch.Tensor] = {}
    todo = []
    for key in dict.fromkeys(prompts):
        text = _key_text(key)
        path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors" if folder else None
        if path is not None and path.is_file():
            try:
                with safe_open(str(path), "pt") as handle:
                    if (handle.metadata() or {}).get("key") == text:
                        entries[key] = handle.get_tensor("embeds")
                        continue
            except Exception:  # noqa: BLE001 - a damaged entry is encoded again
                pass
        todo.append((key, text, path))
    if entries:
        log(f"{len(entries)} prompt encoding(s) reused from the disk cache {folder}")
    for start in range(0, len(todo), 8):
        chunk = todo[start:start + 8]
        captions, images = _controls(model, [k for k, _, _ in chunk])
        encoded = encode_prompt_list(model.text_encoder, model.tokenizer, captions, variant=model.variant,
                                     processor=model.processor, images=images)
        for (key, text, path), embeds in zip(chunk, encoded):
            entries[key] = embeds.cpu().contiguous()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file({"embeds": entries[key]}, str(tmp), metadata={"key": text})

    def lookup(batch: list[Any]) -> Any:
        return stack_prompts([entries[k] for k in batch])

    return lookup


def park_text_encoders(model: QwenModel, keep_for_previews: bool) -> None:
    from core.families.qwen_image.load import free_text_encoder

    free_text_encoder(model)


# --- LoRA ------------------------------------------------------------------------------------------

def add_lora(model: QwenModel, cfg: TrainConfig, init_file: Path | None, log: Log) -> Adapted:
    from peft import LoraConfig

    from core.families.qwen_image.load import lora_targets
    from core.families.qwen_image.lora_files import read_lora
    from core.lora import load_peft_state

    transformer = model.transformer
    transformer.requires_grad_(False)
    if init_file is not None:
        try:
            peft, alphas, _ = read_lora(init_file)
        except Exception as exc:
            raise ValueError(f"'{init_file}' is not a readable Qwen-Image LoRA file: {exc}") from exc
        names = {n for n, _ in transformer.named_modules()}
        foreign = sorted({k.rsplit(".lora_", 1)[0] for k in peft} - names)
        if not peft or foreign:
            raise ValueError(f"'{init_file.name}' does not fit this Qwen-Image transformer "
                             f"({foreign[:3] or 'no LoRA modules'}).")
        config = config_from_lora_file(peft, alphas)
        transformer.add_adapter(config)
        load_peft_state(transformer, peft, "transformer")
        log(f"Continuing from the LoRA {init_file.name} (rank {config.r}, alpha {config.lora_alpha:g})")
    else:
        transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                           lora_dropout=cfg.lora_dropout, init_lora_weights=True,
                                           target_modules=lora_targets(transformer),
                                           use_rslora=cfg.lora_variant == "rslora"))
    config = transformer.peft_config["default"]
    log(f"LoRA rank {config.r} on {len(config.target_modules)} transformer layers; flow matching with "
        f"{timestep_sampling(cfg)} timestep sampling")
    placed = [transformer] if cfg.base_quantization == "nf4" or cfg.blocks_to_swap > 0 else []
    return Adapted([transformer], ["transformer"], [config], placed=placed)


def low_memory(model: QwenModel, adapted: Adapted, cfg: TrainConfig, dtype: torch.dtype, log: Log) -> None:
    from core.families.flux.lora import apply_group_offload, enable_fp8_storage, enable_gradient_checkpointing

    transformer = adapted.modules[0]
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    if cfg.fp8_base:
        # The modulation Linears too (img_mod / txt_mod: 6.8 B of the 20.4 B), as musubi-tuner's fp8_base.
        cast = enable_fp8_storage(transformer, dtype, cast_modulation=True)
        log(f"fp8 storage: {cast} frozen layers stored in float8_e4m3fn, the LoRA in fp32.")
    if cfg.blocks_to_swap > 0:
        if not cfg.fp8_base:
            for name, param in transformer.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(dtype)
        _, message = apply_group_offload(transformer)
        log(message)


def make_loss(model: QwenModel, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    from core.families.qwen_image.load import qwen_loss

    sampling = timestep_sampling(cfg)
    points = dict(model.scheduler_config)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        control = getattr(batch, "control", None)
        return qwen_loss(transformer, QwenBatch(batch.latents, batch.cond, control), timestep_sampling=sampling,
                         shift=cfg.discrete_flow_shift, dtype=dtype, points=points)

    return loss


def _alpha(config: Any, state: dict[str, torch.Tensor]) -> float | dict[str, float]:
    alpha: float | dict[str, float] = float(config.lora_alpha)
    if config.alpha_pattern:
        import re

        paths = {k.rsplit(".lora_", 1)[0] for k in state}
        alpha = {p: float(next((v for pat, v in config.alpha_pattern.items() if re.search(pat, p)),
                               config.lora_alpha)) for p in paths}
    return alpha


def write_loras(folder: Path, cfg: TrainConfig, model: QwenModel, adapted: Adapted, facts: RunFacts,
                save_dtype: torch.dtype) -> dict[str, str]:
    from core.export.metadata import kohya_metadata
    from core.families.qwen_image.lora_files import write_diffusers_file, write_kohya_file
    from core.lora import peft_state

    config = adapted.configs[0]
    state = peft_state(adapted.modules[0])
    meta = kohya_metadata(cfg, family=model.variant, base_model_name=facts.base_model_name,
                          num_images=facts.num_images, tag_frequency=facts.tag_frequency,
                          bucket_info=facts.bucket_info, steps=facts.steps, epochs=facts.epochs,
                          started_at=facts.started_at, dataset_dir=cfg.train_data_dir, session_id=facts.session_id)
    meta.pop("modelspec.prediction_type", None)
    kohya = write_kohya_file(state, folder / f"{cfg.name}.safetensors", variant=model.variant,
                             alpha=_alpha(config, state), metadata=meta, use_rslora=bool(config.use_rslora),
                             dtype=save_dtype)
    diffusers = write_diffusers_file(state, folder, lora_config=config, dtype=save_dtype)
    return {"kohya": str(kohya), "diffusers": str(diffusers)}


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: QwenModel, transformer: Any | None = None, *, edit: bool | None = None) -> Any:
    """QwenImageEditPipeline for an Edit model's previews (`edit`), else QwenImagePipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    parts = dict(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                 transformer=model.transformer if transformer is None else transformer)
    if model.needs_control if edit is None else edit:
        pipe = QwenImageEditPipeline(processor=model.processor, **parts)
    else:
        pipe = QwenImagePipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[Any]], Any] | None = None, dtype: torch.dtype = torch.float32,
             control: Any = None) -> list[Image.Image]:
    """One image per prompt from the same seed. `guidance` is the pipelines' true CFG scale (off at <= 1).

    Edit (QwenImageEditPipeline): `control` (a PIL image) is the image to edit; `embeds` then must be the
    prompts' encodings with that image (or None: the pipeline's VL encoder encodes them).
    """
    from core.devices import free_memory
    from core.families.flux.loss import unpack_latents

    device = pipe.vae.device
    images = []
    step = pipe.vae_scale_factor * 2
    width, height = max(step, width // step * step), max(step, height // step * step)
    cfg_on = guidance > 1.0
    for prompt in prompts:
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, true_cfg_scale=guidance, width=width,
                                      height=height, output_type="latent", return_dict=False,
                                      generator=torch.Generator(device="cpu").manual_seed(seed))
        if control is not None:
            kwargs["image"] = control
        if embeds is None:
            kwargs["prompt"] = prompt
            if cfg_on:
                kwargs["negative_prompt"] = negative_prompt or " "
        else:
            e = embeds([prompt]).to(device, dtype)
            kwargs.update(prompt_embeds=e.embeds, prompt_embeds_mask=e.mask)
            if cfg_on:
                n = embeds([negative_prompt or ""]).to(device, dtype)
                kwargs.update(negative_prompt_embeds=n.embeds, negative_prompt_embeds_mask=n.mask)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            packed = pipe(**kwargs)[0]
        latents = unpack_latents(packed.float(), 2 * (height // step), 2 * (width // step))
        images.extend(decode_latents(pipe.vae, latents))
        free_memory()
    return images


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
    if model.needs_control:
        if not model.preview_control or cached is None:
            return []
        from core.data.image_io import load_rgb

        control = load_rgb(Path(model.preview_control))
        embeds = lambda prompts: cached([(p, model.preview_control) for p in prompts])  # noqa: E731
    return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps,
                    guidance=cfg.sample_guidance_scale, negative_prompt=cfg.sample_negative_prompt, width=width,
                    height=height, embeds=embeds, dtype=dtype, control=control)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.qwen_image.load import load_qwen_model
    from core.sample import move

    model = load_qwen_model(base_model, config_source=model_config, vae=vae)
    for module in (model.transformer, *_encoders(model)):
        move(module, device, dtype)
    move(model.vae, device, torch.float32)
    # The Test tab has no image to edit: an Edit model makes images from text there (QwenImagePipeline).
    return build_pipeline(model, edit=False), model


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
    variant = variant if variant in ("qwen-image", "qwen-image-edit") else "qwen-image"
    return write_kohya_file(peft, path, variant=variant, alpha=alphas, metadata=kept, dtype=dtype)


def _write_diffusers(modules: dict[str, Any], folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    from core.families.qwen_image.lora_files import write_diffusers_file
    from core.families.flux.tools_files import _lora_config

    peft, alphas = _modules_to_peft(modules)
    return write_diffusers_file(peft, folder, lora_config=_lora_config(peft, alphas), dtype=dtype)


def _to_peft(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    from core.families.qwen_image.lora_files import read_lora

    peft, alphas, _ = read_lora(path)
    return peft, alphas


LORA_FILES = LoraFileFormat(to_kohya=_to_kohya, write_kohya=_write_kohya, write_diffusers=_write_diffusers,
                            to_peft=_to_peft)


FAMILY = ImageFamily(
    prompt_cache_optional=False, check=check, load=load, describe=describe,
    name_of=lambda m: m.variant, network=lambda m: m.transformer, text_encoders=_encoders,
    park_text_encoders=park_text_encoders, encode_prompts=encode_prompts, cache_prompts=cache_prompts,
    add_lora=add_lora, low_memory=low_memory, make_loss=make_loss, write_loras=write_loras, previews=previews,
    tryout_pipeline=tryout_pipeline, generate=generate, default_size=default_size, detect=detect,
    encode_moments=encode_moments, normalize_latents=normalize_latents, denormalize_latents=denormalize_latents,
    lora_files=LORA_FILES,
)
