"""Z-Image (Turbo and base) behind the `ImageFamily` interface.

Built from `core.families.zimage.load` (loading, Qwen3 prompts, the loss) and
`core.families.zimage.lora_files` (files). Qwen3-4B encodes every caption once into a disk
cache and is freed before the transformer trains; the LoRA goes on the attention + MLP Linears
of all 34 blocks (30 layers, 2 noise- and 2 context-refiners); flow matching with the
configured sampling (default: shift); fp8 storage, gradient checkpointing and block offload
reuse FLUX's implementations (they are diffusers-generic).

Turbo is step-distilled (8 steps, no CFG). ai-toolkit trains it with a de-distilling "training
adapter" LoRA merged in while training and left out at inference; musubi-tuner and OneTrainer
train plain LoRA. We train plain LoRA on either (short runs on Turbo keep its few-step
behaviour); previews use the model's own regime: Turbo 8 steps without CFG, base with CFG.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.family_api.contract import Adapted, Batch, ImageFamily, Log, RunFacts
from core.families.dit.common import (check_transformer, config_from_lora_file, first_text_encoder_file,
                                                load_dtype_and_quantization)
from core.family_api.registry import family_info


def timestep_sampling(cfg: TrainConfig, variant: str) -> str:
    if cfg.timestep_sampling != "auto":
        return cfg.timestep_sampling
    return family_info(variant).default_timestep_sampling or "shift"


def check(cfg: TrainConfig) -> list[str]:
    return check_transformer(
        cfg, "Z-Image", targets="Z-Image trains the attention and MLP layers of every block",
        ignored_for="only apply to SD models; ignored for Z-Image.",
        encoders="Z-Image always caches Qwen3's outputs (the 4B text encoder is freed before training).")


def load(cfg: TrainConfig) -> Any:
    from core.families.zimage.load import load_model

    dtype, quant = load_dtype_and_quantization(cfg)
    # Z-Image has one text encoder: the first (only) file of `text_encoder_files`.
    return load_model(cfg.base_model, config_source=cfg.base_model_config, text_encoder=first_text_encoder_file(cfg),
                      vae=cfg.vae, dtype=dtype, quantization_config=quant)


def describe(model: Any) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    return [f"Model: {family_info(model.variant).label} ({layout}), flow matching", *model.notes]


def encode_prompts(model: Any, captions: list[str], device: torch.device) -> Any:
    from core.families.zimage.load import encode_prompts as encode

    return encode(model.text_encoder, model.tokenizer, captions)


def cache_prompts(model: Any, captions: list[str], cfg: TrainConfig, device: torch.device,
                  log: Log) -> Callable[[list[str]], Any]:
    from core.families.zimage.load import cache_prompt_embeds, encoder_identity
    from core.train.latent_cache import cache_root_for

    prompts = list(captions) + list(cfg.sample_prompts) + ([cfg.sample_negative_prompt or ""]
                                                           if cfg.sample_prompts else [])
    folder = cache_root_for(cfg.train_data_dir, cfg.output_dir, "text") if cfg.cache_latents_to_disk else None
    entries, hits = cache_prompt_embeds(prompts, lambda chunk: encode_prompts(model, chunk, device), folder,
                                        encoder_identity(model.text_encoder, model.variant))
    if hits:
        log(f"{hits} prompt encoding(s) reused from the disk cache {folder}")
    return lambda batch: [entries[c] for c in batch]


def park_text_encoders(model: Any, keep_for_previews: bool) -> None:
    from core.families.zimage.load import free_text_encoder

    free_text_encoder(model)


def add_lora(model: Any, cfg: TrainConfig, init_file: Path | None, log: Log) -> Adapted:
    from peft import LoraConfig

    from core.families.zimage.load import lora_targets
    from core.families.zimage.lora_files import read_lora
    from core.lora import load_peft_state

    transformer = model.transformer
    transformer.requires_grad_(False)
    if init_file is not None:
        try:
            peft, alphas, _ = read_lora(init_file)
        except Exception as exc:
            raise ValueError(f"'{init_file}' is not a readable Z-Image LoRA file: {exc}") from exc
        config = config_from_lora_file(peft, alphas)
        transformer.add_adapter(config)
        load_peft_state(transformer, peft, "transformer")
        log(f"Continuing from the LoRA {init_file.name} (rank {config.r}, alpha {config.lora_alpha:g})")
    else:
        transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                           lora_dropout=cfg.lora_dropout, init_lora_weights=True,
                                           use_rslora=cfg.lora_variant == "rslora",
                                           target_modules=lora_targets(transformer)))
    config = transformer.peft_config["default"]
    layers = sum(1 for name, _ in transformer.named_modules() if name.endswith(".lora_A"))
    log(f"LoRA rank {config.r} on {layers} transformer layers; flow matching with "
        f"{timestep_sampling(cfg, model.variant)} timestep sampling")
    placed = [transformer] if cfg.base_quantization == "nf4" or cfg.blocks_to_swap > 0 else []
    return Adapted([transformer], ["transformer"], [config], placed=placed)


def low_memory(model: Any, adapted: Adapted, cfg: TrainConfig, dtype: torch.dtype, log: Log) -> None:
    from core.families.flux.lora import apply_group_offload, enable_fp8_storage, enable_gradient_checkpointing

    transformer = adapted.modules[0]
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    if cfg.fp8_base:
        # diffusers' default skips (norms, and Z-Image's own t_embedder / cap_embedder) already cast the
        # adaLN modulation Linears: its names hold no "norm".
        cast = enable_fp8_storage(transformer, dtype)
        log(f"fp8 storage: {cast} frozen layers stored in float8_e4m3fn, the LoRA in fp32.")
    if cfg.blocks_to_swap > 0:
        if not cfg.fp8_base:
            for name, param in transformer.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(dtype)
        _, message = apply_group_offload(transformer)
        log(message)


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    from core.families.zimage.load import ZImageBatch, zimage_loss

    sampling = timestep_sampling(cfg, model.variant)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return zimage_loss(transformer, ZImageBatch(batch.latents, list(batch.cond)), timestep_sampling=sampling,
                           shift=cfg.discrete_flow_shift, dtype=dtype)

    return loss


def write_loras(folder: Path, cfg: TrainConfig, model: Any, adapted: Adapted, facts: RunFacts,
                save_dtype: torch.dtype) -> dict[str, str]:
    """<name>.safetensors in native kohya names (ComfyUI) and diffusers' pytorch_lora_weights.safetensors."""
    import re

    from core.export.metadata import kohya_metadata
    from core.families.zimage.lora_files import write_diffusers_file, write_kohya_file
    from core.lora import peft_state

    config = adapted.configs[0]
    state = peft_state(adapted.modules[0])
    alpha: float | dict[str, float] = float(config.lora_alpha)
    if config.alpha_pattern:
        paths = {k.rsplit(".lora_", 1)[0] for k in state}
        alpha = {p: float(next((v for pat, v in config.alpha_pattern.items() if re.search(pat, p)),
                               config.lora_alpha)) for p in paths}
    meta = kohya_metadata(cfg, family=model.variant, base_model_name=facts.base_model_name,
                          num_images=facts.num_images, tag_frequency=facts.tag_frequency,
                          bucket_info=facts.bucket_info, steps=facts.steps, epochs=facts.epochs,
                          started_at=facts.started_at, dataset_dir=cfg.train_data_dir, session_id=facts.session_id)
    meta.pop("modelspec.prediction_type", None)
    kohya = write_kohya_file(state, folder / f"{cfg.name}.safetensors", variant=model.variant, alpha=alpha,
                             metadata=meta, use_rslora=bool(config.use_rslora), dtype=save_dtype)
    diffusers = write_diffusers_file(state, folder, lora_config=config, dtype=save_dtype)
    return {"kohya": str(kohya), "diffusers": str(diffusers)}


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    pipe = ZImagePipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                          tokenizer=model.tokenizer, transformer=model.transformer if transformer is None else transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[str]], Any] | None = None, dtype: torch.dtype = torch.float32
             ) -> list[Image.Image]:
    """One image per prompt from the same seed; `embeds`: cached encodings instead of Qwen3.

    ZImagePipeline's guidance is real CFG (guidance_scale > 0 runs the negative prompt too; Turbo
    is used with 0). The AE decodes in fp32.
    """
    from core.devices import free_memory
    from core.sample import decode_fp32

    device = pipe.vae.device
    images = []
    for prompt in prompts:
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                                      output_type="latent", return_dict=False,
                                      generator=torch.Generator(device="cpu").manual_seed(seed))
        if embeds is None:
            kwargs.update(prompt=prompt, negative_prompt=negative_prompt or None)
        else:
            kwargs["prompt_embeds"] = [e.to(device, dtype) for e in embeds([prompt])]
            if guidance > 0:
                kwargs["negative_prompt_embeds"] = [e.to(device, dtype) for e in embeds([negative_prompt or ""])]
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(**kwargs)[0]
        images.extend(decode_fp32(pipe.vae, latents))
        free_memory()
    return images


def vae_scale_factor(model: Any) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def preview_size(model: Any, resolution: int) -> tuple[int, int]:
    scale = vae_scale_factor(model)
    floor = family_info(model.variant).sample_size_floor * scale // 8
    step = scale * 2
    side = max(step, max(resolution, floor) // step * step)
    return side, side


def preview_guidance(cfg: TrainConfig, variant: str) -> float:
    """The configured guidance; for Turbo left at the config's default, 0 (no CFG: how Turbo is used)."""
    import dataclasses

    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "sample_guidance_scale")
    if variant == "z-image-turbo" and cfg.sample_guidance_scale == default:
        return 0.0
    return cfg.sample_guidance_scale


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    pipe = build_pipeline(model, transformer)
    width, height = preview_size(model, cfg.resolution)
    return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps,
                    guidance=preview_guidance(cfg, model.variant), negative_prompt=cfg.sample_negative_prompt,
                    width=width, height=height, embeds=cached, dtype=dtype)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.zimage.load import load_model
    from core.sample import move

    model = load_model(base_model, config_source=model_config, vae=vae)
    for module in (model.transformer, model.text_encoder):
        move(module, device, dtype)
    move(model.vae, device, torch.float32)
    return build_pipeline(model), model


def default_size(model: Any) -> int:
    return family_info(model.variant).native_resolution * vae_scale_factor(model) // 8


def _lora_files() -> Any:
    from core.families.zimage.lora_files import lora_file_format

    return lora_file_format()


def _detect(base_model: str) -> str | None:
    from core.families.zimage.load import detect

    return detect(base_model)


ZIMAGE = ImageFamily(
    detect=_detect, lora_files=_lora_files(), prompt_cache_optional=False, check=check, load=load, describe=describe,
    name_of=lambda m: m.variant, network=lambda m: m.transformer,
    text_encoders=lambda m: [m.text_encoder] if m.text_encoder is not None else [],
    park_text_encoders=park_text_encoders, encode_prompts=encode_prompts, cache_prompts=cache_prompts,
    add_lora=add_lora, low_memory=low_memory, make_loss=make_loss, write_loras=write_loras, previews=previews,
    tryout_pipeline=tryout_pipeline, generate=generate, default_size=default_size,
)
FAMILY = ZIMAGE
