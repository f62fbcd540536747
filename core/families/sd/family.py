"""Stable Diffusion 1.x / 2.x / SDXL: the UNet families behind the `ImageFamily` interface.

Loading is `core.families.sd.load` (single file, diffusers folder, hub id); the LoRA goes on the
UNet's attention (and LoCon convolutions) through diffusers' `add_adapter` and, with
train_text_encoder, on the CLIP encoders (`core.families.sd.lora`); the loss is epsilon /
v-prediction with SDXL's pooled embedding and size/crop time ids (`core.families.sd.loss`);
files are the kohya/WebUI and diffusers ones of `core.export`. The only module that knows
SDXL has two text encoders and added conditioning.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.family_api.contract import Adapted, BaseWeights, Batch, ImageFamily, Log, RunFacts
from core.family_api.registry import family_info
from core.families.sd.lora import TE_NAMES

_FLUX_ONLY = {"fp8_base": False, "base_quantization": "none", "blocks_to_swap": 0, "clip_l": "", "t5": ""}


def _is_xl(model: Any) -> bool:
    # SDXL's second encoder gives the pooled embedding and the UNet takes added conditioning.
    return len(model.text_encoders) == 2


# --- prompts --------------------------------------------------------------------------------------

def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [B, max_length], padded/truncated to the tokenizer's length (77 for CLIP)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_with(text_encoders: Sequence[Any], tokenizers: Sequence[Any], captions: Sequence[str],
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings [B, 77, D], pooled embedding [B, P] with two encoders (SDXL) else None)."""
    if len(text_encoders) == 1:
        ids = tokenize(tokenizers[0], captions).to(device)
        return text_encoders[0](ids, return_dict=False)[0], None
    hidden, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenize(tokenizer, captions).to(device)
        out = encoder(ids, output_hidden_states=True, return_dict=True)
        # SDXL conditions on the penultimate layer of both encoders; pooled from the second.
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(original_sizes: Sequence[tuple[int, int]], crops: Sequence[tuple[int, int]],
                  target_sizes: Sequence[tuple[int, int]], device: torch.device | str,
                  dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per image."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crops, target_sizes)]
    return torch.tensor(rows, device=device, dtype=dtype)


def encode_prompts(model: Any, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return encode_with(model.text_encoders, model.tokenizers, captions, device)


def cache_prompts(model: Any, captions: list[str], cfg: TrainConfig, device: torch.device,
                  log: Log) -> Callable[[list[str]], Any]:
    """Every caption encoded once, kept in memory (CLIP outputs are small)."""
    from core.train.latent_cache import TextCache

    cache = TextCache()
    cache.build(captions, lambda chunk: encode_prompts(model, chunk, device))
    return cache.batch


# --- the model ----------------------------------------------------------------------------------

def check(cfg: TrainConfig) -> list[str]:
    """Warnings for FLUX-only settings, which a UNet run ignores."""
    unused = [k for k, default in _FLUX_ONLY.items() if getattr(cfg, k) != default]
    return [f"{', '.join(unused)} only apply to FLUX / Chroma models; ignored for this model."] if unused else []


def load(cfg: TrainConfig) -> Any:
    from core.families.sd.load import load_sd_model

    return load_sd_model(cfg.base_model, allow_pickle=cfg.allow_pickle, vae=cfg.vae,
                         prediction_type=cfg.prediction_type, model_config=cfg.base_model_config, defer_unet=True)


def describe(model: Any) -> list[str]:
    layout = "single file" if model.is_single_file else "diffusers"
    return [f"Model: {family_info(model.family).label} ({layout}), prediction {model.prediction_type}",
            *model.notes]


def park_text_encoders(model: Any, keep_for_previews: bool) -> None:
    from core.sample import move

    for encoder in model.text_encoders:
        move(encoder, "cpu")
    if not keep_for_previews:
        model.text_encoders = [None] * len(model.text_encoders)


# --- LoRA -----------------------------------------------------------------------------------------

def add_lora(model: Any, cfg: TrainConfig, init_file: Path | None, log: Log) -> Adapted:
    """LoRA on the UNet (and the text encoders with train_text_encoder), from `init_file` when given."""
    from core.export.kohya import fit_keys_to_model
    from core.families.sd.lora import add_text_encoder_lora, add_unet_lora, module_paths, read_lora_file
    from core.lora import load_peft_state, peft_state

    loaded = None
    lora_cfg = cfg
    if init_file is not None:
        loaded = read_lora_file(init_file, model.family)
        # A LoRA file already holds its update: it continues as a plain LoRA, whatever the variant.
        variant = "lora" if cfg.lora_variant == "pissa" else cfg.lora_variant
        lora_cfg = dataclasses.replace(cfg, lora_rank=loaded.rank, lora_alpha=loaded.alpha,
                                       target_modules=module_paths(loaded.unet), conv_rank=0, lora_variant=variant)
        log(f"Continuing from the LoRA {init_file.name} (rank {loaded.rank}, alpha {loaded.alpha:g})")
    configs = [add_unet_lora(model.unet, lora_cfg)]
    encoders: list[nn.Module] = []
    if cfg.train_text_encoder:
        for index, encoder in enumerate(model.text_encoders):
            targets = module_paths(loaded.text_encoders[index]) if loaded and index < len(
                loaded.text_encoders) and loaded.text_encoders[index] else None
            configs.append(add_text_encoder_lora(encoder, lora_cfg, targets))
            encoders.append(encoder)
    pissa_init = None
    if lora_cfg.lora_variant == "pissa":
        # PiSSA rewrote the base weights; keep its starting point to export a LoRA for the original.
        pissa_init = [peft_state(model.unet)] + [peft_state(e) for e in encoders]
    if loaded is not None:
        load_peft_state(model.unet, loaded.unet, "UNet")
        for encoder, state in zip(encoders, loaded.text_encoders):
            if state:
                load_peft_state(encoder, fit_keys_to_model(state, encoder), "text encoder")
    return Adapted([model.unet, *encoders], ["unet", *TE_NAMES[:len(encoders)]], configs, pissa_init)


def low_memory(model: Any, adapted: Adapted, cfg: TrainConfig, dtype: torch.dtype, log: Log) -> None:
    from core.train import runtime

    if cfg.gradient_checkpointing:
        adapted.modules[0].enable_gradient_checkpointing()
        for encoder in adapted.modules[1:]:
            runtime.enable_activation_checkpointing(encoder)


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """Epsilon / v-prediction loss with the model's DDPM noise schedule (SDXL: added conditioning)."""
    from core.families.sd.loss import diffusion_loss

    scheduler = model.noise_scheduler()
    xl = _is_xl(model)

    def loss(unet: nn.Module, batch: Batch) -> torch.Tensor:
        embeds, pooled = batch.cond
        added = None
        if xl:
            device = batch.latents.device
            time_ids = sdxl_time_ids([s[0] for s in batch.sizes], [s[1] for s in batch.sizes],
                                     [s[2] for s in batch.sizes], device, dtype)
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        return diffusion_loss(unet, scheduler, batch.latents, embeds, prediction_type=model.prediction_type,
                              noise_offset=cfg.noise_offset, snr_gamma=cfg.snr_gamma, added_cond=added,
                              weight_dtype=dtype)

    return loss


def write_loras(folder: Path, cfg: TrainConfig, model: Any, adapted: Adapted, facts: RunFacts,
                save_dtype: torch.dtype) -> dict[str, str]:
    """<name>.safetensors (kohya/WebUI) and pytorch_lora_weights.safetensors (diffusers)."""
    from core.export.metadata import kohya_metadata
    from core.families.sd.lora import save_lora_outputs

    metadata = kohya_metadata(cfg, family=model.family, base_model_name=facts.base_model_name,
                              num_images=facts.num_images, tag_frequency=facts.tag_frequency,
                              bucket_info=facts.bucket_info, steps=facts.steps, epochs=facts.epochs,
                              started_at=facts.started_at, dataset_dir=cfg.train_data_dir,
                              prediction_type=model.prediction_type, session_id=facts.session_id,
                              conv_dims=(cfg.conv_rank, cfg.conv_alpha or cfg.conv_rank) if cfg.conv_rank else None)
    return save_lora_outputs(folder, cfg.name, family=model.family, unet=adapted.modules[0],
                             encoders=adapted.modules[1:], unet_config=adapted.configs[0],
                             te_configs=adapted.configs[1:], metadata=metadata, save_dtype=save_dtype,
                             pissa_init=adapted.pissa_init)


# --- previews and the Test tab ---------------------------------------------------------------------

def build_pipeline(model: Any, unet: Any | None = None) -> Any:
    """A diffusers pipeline over the model's modules (nothing copied), with an Euler sampler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    config["prediction_type"] = model.prediction_type
    scheduler = EulerDiscreteScheduler.from_config(config)
    unet = model.unet if unet is None else unet
    encoders, tokenizers = model.text_encoders, model.tokenizers
    if _is_xl(model):
        return StableDiffusionXLPipeline(vae=model.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler)
    return StableDiffusionPipeline(vae=model.vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int) -> list[Image.Image]:
    """One image per prompt, each from the same fixed seed so runs compare; the VAE decodes in fp32."""
    from core.devices import free_memory
    from core.sample import decode_fp32

    images = []
    device = pipe.unet.device
    for prompt in prompts:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                       guidance_scale=guidance, width=width, height=height, generator=generator,
                       output_type="latent", return_dict=False)[0]
        images.extend(decode_fp32(pipe.vae, latents.to(device)))
        del latents
        free_memory()
    return images


def preview_size(model: Any, resolution: int) -> tuple[int, int]:
    """The training resolution, but never below the family's floor (SDXL at 512 px gives mush)."""
    side = max(resolution, family_info(model.family).sample_size_floor)
    step = model.vae_scale_factor * 8
    side = max(step, side // step * step)
    return side, side


def previews(model: Any, unet: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    """Previews with the UNet being trained; parked text encoders visit the device only meanwhile."""
    from core.sample import move

    # Frozen encoders were parked on the CPU only when their outputs were cached.
    moved = [e for e in model.text_encoders if e is not None] if cached is not None else []
    for encoder in moved:
        move(encoder, device, dtype)
    try:
        pipe = build_pipeline(model, unet)
        pipe.set_progress_bar_config(disable=True)
        width, height = preview_size(model, cfg.resolution)
        return generate(pipe, cfg.sample_prompts, seed=cfg.sample_seed, steps=cfg.sample_num_inference_steps,
                        guidance=cfg.sample_guidance_scale, negative_prompt=cfg.sample_negative_prompt,
                        width=width, height=height)
    finally:
        for encoder in moved:
            move(encoder, "cpu")


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                  device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(pipeline, SDModel) of `base_model` on `device` for the Test tab."""
    from core.families.sd.load import load_sd_model
    from core.sample import move

    model = load_sd_model(base_model, allow_pickle=allow_pickle, vae=vae, model_config=model_config)
    for module in [model.unet, *model.text_encoders]:
        move(module, device, dtype)
    move(model.vae, device, torch.float32)
    pipe = build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def open_base_weights(base_model: str, *, allow_pickle: bool = False, model_config: str = "") -> BaseWeights:
    """The UNet and text encoders of an SD checkpoint for the LoRA tools, and its single-file writer."""
    from core.families.sd.convert import pipeline_to_single_file
    from core.families.sd.load import load_sd_model

    model = load_sd_model(base_model, allow_pickle=allow_pickle, model_config=model_config)

    def to_single_file(dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        state = pipeline_to_single_file(model.family, unet=model.unet, vae=model.vae,
                                        text_encoders=model.text_encoders, dtype=dtype)
        if model.prediction_type == "v_prediction":
            state["v_pred"] = torch.tensor([])  # the marker WebUI / sd-scripts read for v-prediction models
        return state

    components = {"unet": model.unet, **dict(zip(TE_NAMES, model.text_encoders))}
    return BaseWeights(model.family, components, to_single_file)


def identify(base_model: str, allow_pickle: bool) -> str:
    """sd1 / sd2 / sdxl of any model this family serves (a pickled checkpoint only when allowed)."""
    from core.families.sd.load import model_family

    return model_family(base_model, allow_pickle=allow_pickle)


SD = ImageFamily(
    check=check, load=load, describe=describe, name_of=lambda m: m.family,
    network=lambda m: m.unet, load_network=lambda m: m.load_unet(), text_encoders=lambda m: list(m.text_encoders),
    park_text_encoders=park_text_encoders,
    encode_prompts=encode_prompts, cache_prompts=cache_prompts, add_lora=add_lora, low_memory=low_memory,
    make_loss=make_loss, write_loras=write_loras, previews=previews, tryout_pipeline=tryout_pipeline,
    generate=generate, default_size=lambda m: family_info(m.family).native_resolution, identify=identify,
    open_base_weights=open_base_weights,
)

FAMILY = SD  # what the registry row's `impl` names
