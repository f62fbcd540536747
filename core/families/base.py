"""The one interface between the image training path and a model family's behaviour.

`ImageRun` (core.train.image), its outputs (core.train.image_outputs), the previews
(core.sample) and the LoRA tools ask an `ImageFamily` for everything that differs between
families, and never test a family's name themselves. `ImageFamily` is a frozen dataclass of
plain functions; each registry row names the module holding its instance (`impl`, attribute
`FAMILY`): `core.families.sd.SD`, `core.families.flux_family.FLUX`, ... `family_impl(name)`
picks one by a registry name, `family_for_model(base_model)` by the model's files (each
family's `detect`, SD last). `detect_image_family` names the family of a `base_model`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import importlib

import torch
from torch import nn

from core.config import TrainConfig

Log = Callable[[str], None]


@dataclass
class Adapted:
    """The modules a run trains, carrying their LoRA, and what writing and resuming them needs.

    `modules[0]` is the denoising network (UNet / transformer); the rest are text encoders
    trained along. `names[i]` names module i in checkpoints (`<name>_peft.safetensors`).
    """

    modules: list[nn.Module]
    names: list[str]
    configs: list[Any]                     # the LoraConfig of each module, same order
    pissa_init: list[dict[str, torch.Tensor]] | None = None  # a PiSSA run's starting LoRA states
    # Modules the family already put where they run (NF4 on the GPU): the run does not move or cast them.
    placed: list[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class RunFacts:
    """What the LoRA file's metadata says about the run (the family adds its own keys)."""

    base_model_name: str
    num_images: int
    tag_frequency: dict[str, int]
    bucket_info: dict | None
    steps: int
    epochs: int
    started_at: float
    session_id: int


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the loss sees it: scaled latents, the captions' conditioning, image sizes."""

    latents: torch.Tensor                                    # [B, C, h, w], after scaling / shift
    cond: Any                                                # what `encode_prompts` returned, batched
    sizes: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    # (original size, crop top-left, target size) per image, for SDXL's micro-conditioning


def vae_moments(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """An AutoencoderKL's latent moments [B, 2C, h, w] (mean and logvar) of pixels in [-1, 1]."""
    return vae.encode(pixels).latent_dist.parameters


def normalize_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """Sampled VAE latents -> what the network is trained on: (x - shift) * scale."""
    shift = getattr(vae_config, "shift_factor", None)
    return (latents - (shift or 0.0)) * vae_config.scaling_factor


def denormalize_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalize_latents`, before decoding."""
    shift = getattr(vae_config, "shift_factor", None)
    return latents / vae_config.scaling_factor + (shift or 0.0)


@dataclass(frozen=True)
class LoraFileFormat:
    """What the LoRA tools (inspect, convert, resize, merge) need from a family with its own file layout.

    The tools hold every image LoRA under kohya names (`lora_unet_...`); for these families the
    names are of the family's native modules (what WebUI / ComfyUI load), fused modules kept fused.
    """

    # (path, its tensors) -> kohya-named tensors, from any form of the family's LoRA file.
    to_kohya: Callable[[Path, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    # (modules, path, *, variant, metadata, dtype) -> the WebUI / ComfyUI file.
    write_kohya: Callable[..., Path]
    # (modules, folder, *, dtype) -> folder/pytorch_lora_weights.safetensors.
    write_diffusers: Callable[..., Path]
    # path -> (diffusers-named PEFT state, alpha per module): what `inspect` lists.
    to_peft: Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, float]]]


@dataclass(frozen=True)
class ImageFamily:
    """What the training path and the previews need from one kind of image model.

    `model` below is the family's own loaded-model object (`SDModel`, `FluxModel`); the run
    only reads its `vae` attribute directly.
    """

    # Refuse what cannot work, before anything is loaded; returns warnings to show.
    check: Callable[[TrainConfig], list[str]]
    load: Callable[[TrainConfig], Any]
    # Lines for the log on what was loaded (name, layout, prediction type, notes).
    describe: Callable[[Any], list[str]]
    name_of: Callable[[Any], str]                      # the registry family name of a loaded model
    network: Callable[[Any], nn.Module]                # the network that gets the LoRA
    text_encoders: Callable[[Any], list[Any]]          # the frozen text encoders (None once freed)
    # Drop the text encoders after their outputs are cached; `keep_for_previews`: only off the device.
    park_text_encoders: Callable[[Any, bool], None]
    encode_prompts: Callable[[Any, list[str], torch.device], Any]
    # (model, captions, cfg, device) -> lookup(captions) -> batched conditioning, from a cache.
    cache_prompts: Callable[[Any, list[str], TrainConfig, torch.device, Log], Callable[[list[str]], Any]]
    # (model, cfg, init LoRA file or None, log) -> the adapted modules (still on the CPU).
    add_lora: Callable[[Any, TrainConfig, Path | None, Log], Adapted]
    # After the modules are on the device with fp32 LoRA: checkpointing, fp8 storage, offload.
    low_memory: Callable[[Any, Adapted, TrainConfig, torch.dtype, Log], None]
    # (model, cfg, weight dtype) -> loss(network as prepared, batch) -> scalar fp32 loss.
    make_loss: Callable[[Any, TrainConfig, torch.dtype], Callable[[nn.Module, Batch], torch.Tensor]]
    # (folder, cfg, model, adapted modules unwrapped, facts, save dtype) -> {"kohya": path, "diffusers": path}
    write_loras: Callable[[Path, TrainConfig, Any, Adapted, RunFacts, torch.dtype], dict[str, str]]
    # Previews during training: (model, network being trained, cfg, device, weight dtype, prompt lookup or None).
    previews: Callable[[Any, nn.Module, TrainConfig, torch.device, torch.dtype, Any], list[Any]]
    # The Test tab: (base_model, *, allow_pickle, vae, model_config, device, dtype) -> (pipeline, model).
    tryout_pipeline: Callable[..., tuple[Any, Any]]
    # The Test tab's images: (pipeline, prompts, seed, steps, guidance, negative, width, height).
    generate: Callable[..., list[Any]]
    # The default preview size of a loaded model for the Test tab.
    default_size: Callable[[Any], int]
    # False: the prompts are always encoded once and the encoders freed (FLUX's T5 is too large to keep).
    prompt_cache_optional: bool = True
    # base_model -> the registry family when this module serves it, else None (from files / configs only).
    detect: Callable[[str], str | None] | None = None
    # (vae, pixels [B, 3, H, W] in [-1, 1]) -> latent moments [B, 2C, h, w]: what the latent cache stores.
    encode_moments: Callable[[Any, torch.Tensor], torch.Tensor] = vae_moments
    normalize_latents: Callable[[Any, torch.Tensor], torch.Tensor] = normalize_latents
    denormalize_latents: Callable[[Any, torch.Tensor], torch.Tensor] = denormalize_latents
    lora_files: LoraFileFormat | None = None            # None: the tools' SD (kohya UNet) handling


def family_impl(name: str) -> ImageFamily:
    """The behaviour of registry family `name` ("sd1", "sdxl", "flux-dev", "chroma", ...)."""
    from core.families.registry import family_info

    return importlib.import_module(family_info(name).impl).FAMILY


def _detectors() -> list[ImageFamily]:
    """The families that recognise their own files, once each, in table order (SD is the fallback)."""
    from core.families.registry import FAMILIES

    modules = dict.fromkeys(info.impl for info in FAMILIES.values() if info.kind != "unet")
    return [importlib.import_module(m).FAMILY for m in modules]


def transformer_family_of(base_model: str) -> str | None:
    """The registry family of `base_model` when a non-UNet family recognises it; else None."""
    for family in _detectors():
        if family.detect is not None:
            name = family.detect(base_model)
            if name is not None:
                return name
    return None


def family_for_model(base_model: str) -> ImageFamily:
    """The behaviour that serves `base_model`, from its headers / configs only (nothing is loaded).

    Which SD family (1.x, 2.x, XL) is settled when the SD loader reads the file, so a pickled
    checkpoint is not read twice.
    """
    from core.families.registry import IMAGE_FAMILIES

    name = transformer_family_of(base_model)
    return family_impl(name if name is not None else IMAGE_FAMILIES[0])


def detect_image_family(base_model: str, *, allow_pickle: bool = False) -> str:
    """The registry family name of `base_model` (file, diffusers folder or hub id).

    The transformer families first (each family's `detect`), then the SD detectors (which read
    a whole pickled checkpoint: prefer `family_for_model` to train).
    """
    name = transformer_family_of(base_model)
    if name is not None:
        return name
    from core.models.sd import model_family

    return model_family(base_model, allow_pickle=allow_pickle)


def hub_family(repo: str, class_names: dict[str, str]) -> str | None:
    """A cached hub pipeline's family from its model_index.json `_class_name`, by `class_names`
    (class name -> registry name); None when not reachable offline or not one of them."""
    from diffusers import DiffusionPipeline

    from core.families.flux_load import _offline

    try:
        index = dict(DiffusionPipeline.load_config(repo, local_files_only=_offline()))
    except Exception:  # noqa: BLE001 - not a reachable pipeline: the SD loader reports what is wrong with it
        return None
    return class_names.get(str(index.get("_class_name", "")))
