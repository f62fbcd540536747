"""Wan 2.1 text-to-video (1.3B, 14B) behind the `ImageFamily` interface.

Built from `core.families.wan.load` (loading), `.single_file` (ComfyUI's files), `.text` (UMT5 prompts),
`.loss` and `.lora_files` on the transformer families' default (core.families.dit.default). UMT5-XXL
encodes every caption once into the disk cache and is freed before the transformer trains; clips and
images are encoded once by the Wan VAE into [16, F, h, w] latents (an image is one frame); the LoRA goes
on the self- and cross-attention q/k/v/o and the FFN Linears of every block (musubi-tuner's lora_wan);
flow matching with Wan's shift (3.0). fp8 storage, gradient checkpointing and block offload are the
transformer families' shared ones (core.families.dit).

Previews and the Test tab make short clips: the pipeline's latents [1, 16, F', h, w] decoded by the VAE in
fp32 into frames; each clip is returned as its first frame carrying the frames (core.sample.clip_image),
which the previews row shows as the thumbnail and core.sample.save_image writes as an mp4 beside it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.config import TrainConfig
from core.families.dit.common import first_text_encoder_file
from core.families.dit import default
from core.families.dit.default import (TransformerSpec, fixed_targets, flow_scheduler, lazy, place_for_tryout,
                                       sample_settings, transformer_family)
from core.families.wan import experts
from core.families.wan.experts import trains_both
from core.families.wan.i2v import condition_moments, normalize_condition_latents
from core.families.wan.load import expands_timesteps, is_i2v
from core.families.dit.video_vae import denormalize_latents
from core.families.wan.loss import make_loss, wan_shift
from core.families.wan.text import encode_entries, prompt_identity, stack
from core.family_api.registry import family_info

PREVIEW_FPS = 16          # Wan's frame rate
TI2V_FPS = 24             # Wan 2.2 TI2V-5B's (its model card: 720p at 24 fps)
PREVIEW_MAX_FRAMES = 33   # previews: at most ~2 s, whatever video_frames is
TEST_FRAMES = 17          # the Test tab's clips (1 s at 16 fps)
SPATIAL, TEMPORAL, PATCH = 8, 4, 2


def load(cfg: TrainConfig, *, dtype: torch.dtype, quantization_config: Any) -> Any:
    from core.families.wan.load import load_model

    return load_model(cfg.base_model, config_source=cfg.base_model_config, text_encoder=first_text_encoder_file(cfg),
                      vae=cfg.vae, dtype=dtype, quantization_config=quantization_config, expert=cfg.wan_expert)


def write_kohya(model: Any, state: dict[str, torch.Tensor], path: Path, **kwargs: Any) -> Path:
    """Wan's native names with the `diffusion_model.` prefix (ComfyUI); a Wan 2.2 A14B expert's file says which
    model node it goes on: `<name>_high_noise.safetensors` / `<name>_low_noise.safetensors`."""
    from core.families.wan.lora_files import write_kohya_file

    if model.expert:
        path = path.with_name(f"{path.stem}_{model.expert}_noise{path.suffix}")
        kwargs["metadata"] = {**(kwargs.get("metadata") or {}), "ss_wan_expert": f"{model.expert}_noise",
                              "ss_wan_boundary_ratio": f"{model.boundary_ratio:g}"}
    return write_kohya_file(state, path, variant=model.variant, **kwargs)


# --- previews and the Test tab ----------------------------------------------------------------------

def build_pipeline(model: Any, transformer: Any | None = None) -> Any:
    """WanPipeline (an I2V model: WanImageToVideoPipeline, with its image encoder) with `transformer` (default: the
    model's) as the trained network; a Wan 2.2 A14B model's other expert takes its side of boundary_ratio
    (without it, the trained expert runs every step)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    network = model.transformer if transformer is None else transformer
    experts: dict[str, Any] = {"transformer": network}
    if model.expert and model.other_expert is not None:
        high, low = (model.other_expert, network) if model.expert == "low" else (network, model.other_expert)
        experts = {"transformer": high, "transformer_2": low, "boundary_ratio": model.boundary_ratio}
    if is_i2v(model.variant):
        experts.update(image_encoder=model.image_encoder, image_processor=model.image_processor)
    if expands_timesteps(model.variant):
        experts["expand_timesteps"] = True
    pipeline = WanImageToVideoPipeline if is_i2v(model.variant) else WanPipeline
    pipe = pipeline(tokenizer=model.tokenizer, text_encoder=model.text_encoder, vae=model.vae,
                    scheduler=flow_scheduler(model), **experts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_size(resolution: int, variant: str, spatial: int = SPATIAL) -> tuple[int, int]:
    """A square side in whole latent patches (16 px; 32 px with TI2V-5B's 16x VAE), not below the family's floor."""
    step = spatial * PATCH
    side = max(step, max(resolution, family_info(variant).sample_size_floor) // step * step)
    return side, side


@torch.no_grad()
def decode_clip(vae: Any, latents: torch.Tensor) -> list[list[Image.Image]]:
    """Latents [B, 16, F', h, w] -> the frames of each clip, the VAE in fp32."""
    device = next(vae.parameters()).device
    latents = denormalize_latents(vae.config, latents.to(device, torch.float32))
    video = vae.to(torch.float32).decode(latents, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
    return [[Image.fromarray(f) for f in clip] for clip in frames]


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
             negative_prompt: str = "", width: int, height: int,
             embeds: Callable[[list[str]], Any] | None = None, dtype: torch.dtype = torch.float32,
             frames: int = TEST_FRAMES, start_image: Image.Image | None = None) -> list[Image.Image]:
    """One clip per prompt from the same seed, each as its first frame carrying all frames (core.sample.clip_image).

    `embeds`: cached UMT5 encodings instead of the encoder; guidance > 1 runs the negative prompt too (CFG);
    `start_image`: an I2V pipeline's first frame (resized to the clip's size by the pipeline).
    """
    from core.devices import free_memory
    from core.sample import clip_image

    device = pipe.vae.device
    # Whole latent patches (16 px; 32 px with TI2V-5B's 16x VAE): the Test tab's sizes come in steps of 8.
    step = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    width, height = max(step, width // step * step), max(step, height // step * step)
    clips = []
    for prompt in prompts:
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                                      num_frames=frames, output_type="latent", return_dict=False,
                                      generator=torch.Generator(device="cpu").manual_seed(seed))
        if start_image is not None and getattr(pipe.config, "expand_timesteps", False) and \
                type(pipe).__name__ == "WanPipeline":
            pipe = image_to_video(pipe)  # TI2V-5B from a start image: the I2V pipeline over the same modules
        if type(pipe).__name__ == "WanImageToVideoPipeline":
            if start_image is None:
                raise ValueError("An image-to-video Wan starts from an image: give a start image.")
            kwargs["image"] = start_image.convert("RGB")
            # diffusers 0.42's I2V prompt cleaning needs ftfy (T2V's does not): the same encoding, ours
            embeds = embeds or partial(own_encoding, pipe)
        if embeds is None:
            kwargs.update(prompt=prompt, negative_prompt=negative_prompt or "")
        else:
            kwargs["prompt_embeds"] = embeds([prompt]).to(device, dtype)
            kwargs["negative_prompt_embeds"] = embeds([negative_prompt or ""]).to(device, dtype)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(**kwargs)[0]
        fps = TI2V_FPS if getattr(pipe.config, "expand_timesteps", False) else PREVIEW_FPS
        clips.extend(clip_image(clip, fps) for clip in decode_clip(pipe.vae, latents))
        free_memory()
    return clips


def image_to_video(pipe: Any) -> Any:
    """A TI2V-5B WanPipeline's modules as WanImageToVideoPipeline (expand_timesteps: the start frame kept clean)."""
    from diffusers import WanImageToVideoPipeline

    i2v = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                  scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    return i2v


def own_encoding(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """The pipeline's prompt encoding (UMT5, 512 tokens, zeros after the real ones) by core.families.wan.text."""
    from core.families.wan.text import encode_prompts, pad

    return pad(encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts))


def previews(model: Any, transformer: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             cached: Any) -> list[Image.Image]:
    from core.sample import move

    spatial = getattr(model.vae.config, "scale_factor_spatial", SPATIAL)
    width, height = clip_size(cfg.resolution, model.variant, spatial)
    frames = min(cfg.video_frames, PREVIEW_MAX_FRAMES)
    if is_i2v(model.variant) or expands_timesteps(model.variant):
        settings = dict(sample_settings(cfg), start_image=preview_start_image(model, cfg))
    else:
        settings = sample_settings(cfg)
    if trains_both(model):  # both experts train: they are where the run keeps them (core.families.wan.experts)
        low, was_training = model.other_expert, model.other_expert.training
        low.eval()  # the run puts only `transformer` in eval mode for its previews
        try:
            return generate(build_pipeline(model, transformer), cfg.sample_prompts, **settings, width=width,
                            height=height, embeds=cached, dtype=dtype, frames=frames)
        finally:
            low.train(was_training)
    other = model.other_expert if _room_for(model.other_expert, device, dtype) else None
    pipe = build_pipeline(model, transformer) if other is not None or model.other_expert is None else \
        build_pipeline(_alone(model), transformer)
    if other is not None:
        move(other, device, dtype)  # the frozen expert visits the device for the previews only
    try:
        return generate(pipe, cfg.sample_prompts, **settings, width=width, height=height, embeds=cached,
                        dtype=dtype, frames=frames)
    finally:
        if other is not None:
            move(other, "cpu")


def preview_start_image(model: Any, cfg: TrainConfig) -> Image.Image:
    """An I2V run's previews start from the first frame of the data set's first clip or image (found once)."""
    if getattr(model, "start_image", None) is None:
        from core.data.images import scan_image_dataset
        from core.families.wan.text import start_picture

        item = scan_image_dataset(cfg).items[0]
        model.start_image = start_picture(str(item.path), item.frames[0] if item.frames else -1)
    return model.start_image


def _room_for(module: Any, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a Wan 2.2 A14B's frozen other expert fits on the device beside the run for the previews (a second
    14B in bf16 does not fit a 24 GB card: the previews then run the trained expert alone)."""
    if module is None or device.type != "cuda":
        return module is not None
    need = sum(p.numel() for p in module.parameters()) * torch.tensor([], dtype=dtype).element_size() * 1.1
    return torch.cuda.mem_get_info(device)[0] > need


def _alone(model: Any) -> Any:
    """The model as if it had no other expert (its trained one runs every preview step)."""
    import dataclasses

    return dataclasses.replace(model, other_expert=None)


def tryout_pipeline(base_model: str, *, allow_pickle: bool = False, vae: str = "", model_config: str = "",
                    device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from core.families.wan.load import load_model

    model = place_for_tryout(load_model(base_model, config_source=model_config, vae=vae, dtype=dtype), device, dtype)
    if model.other_expert is not None:
        from core.sample import move

        move(model.other_expert, device, dtype)
    return build_pipeline(model), model


def default_size(model: Any) -> int:
    return family_info(model.variant).native_resolution


_FILES = "core.families.wan.lora_files"
_LOAD = "core.families.wan.load"

SPEC = TransformerSpec(
    label="Wan", trains="Wan trains the self- and cross-attention and feed-forward layers of every block",
    encoders_note="Wan always caches UMT5's outputs (the 5.7B text encoder is freed before training).",
    load=load, lora_targets=fixed_targets(_LOAD, "lora_targets"), make_loss=make_loss,
    read_lora=lazy(_FILES, "read_lora"), write_kohya=write_kohya, write_diffusers=lazy(_FILES, "write_diffusers_file"),
    encode_entries=encode_entries, stack=stack,
    prompt_identity=prompt_identity, lora_init=True,
    training_note=lambda model, cfg: f"shift {wan_shift(cfg):g} timestep sampling",
    extra_metadata=lambda cfg: {"ss_discrete_flow_shift": f"{wan_shift(cfg):g}",
                                "ss_target_frames": str(cfg.video_frames)},
    fp8_cast_modulation=False)

# No `variant_from_keys`: a Wan 2.2 A14B expert's file is told by its name (high_noise / low_noise), which
# `detect` reads beside the header.
def check(cfg: TrainConfig) -> list[str]:
    experts.check_both(cfg)
    return default.check(SPEC, cfg)


# Wan 2.2 A14B's `wan_expert: both` adapts, stores and writes the two experts (core.families.wan.experts).
WAN = transformer_family(SPEC, detect=lazy(_LOAD, "detect"), lora_files=lazy(_FILES, "lora_file_format")(), previews=previews,
                         tryout_pipeline=tryout_pipeline, generate=generate, default_size=default_size,
                         normalize_latents=normalize_condition_latents, denormalize_latents=denormalize_latents,
                         encode_moments=condition_moments, check=check,
                         add_lora=partial(experts.add_lora, partial(default.add_lora, SPEC)),
                         low_memory=partial(experts.low_memory, partial(default.low_memory, SPEC)),
                         write_loras=partial(experts.write_loras, partial(default.write_loras, SPEC)))
FAMILY = WAN
