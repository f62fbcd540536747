"""The one interface between the image training path and a model family's behaviour.

`ImageRun` (core.train.image), its outputs (core.train.image_outputs) and the previews
(core.sample) ask an `ImageFamily` for everything that differs between SD 1.x/2.x/SDXL
and FLUX.1/Chroma, and never test a family's name themselves. `ImageFamily` is a frozen
dataclass of plain functions; `core.families.sd.SD` and `core.families.flux_family.FLUX`
are its two instances: `family_impl(name)` picks one by a family name of the registry
(`core.families.registry`), `family_for_model(base_model)` by the model's files.
`detect_image_family` names the family of a `base_model` from its files.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def family_impl(name: str) -> ImageFamily:
    """The behaviour of registry family `name` ("sd1", "sdxl", "flux-dev", "chroma", ...)."""
    from core.families.registry import family_info

    kind = family_info(name).kind
    if kind == "flux":
        from core.families.flux_family import FLUX

        return FLUX
    from core.families.sd import SD

    return SD


def flux_variant_of(base_model: str) -> str | None:
    """"flux-dev" / "flux-schnell" / "chroma" for a FLUX-family file, folder or cached hub id; else None."""
    from core.families.flux_load import detect_variant

    variant = detect_variant(base_model)
    if variant is None and not Path(base_model).exists() and not base_model.lower().endswith(".safetensors"):
        variant = _hub_flux_variant(base_model)
    return variant


def family_for_model(base_model: str) -> ImageFamily:
    """The behaviour that serves `base_model`, from its headers / configs only (nothing is loaded).

    Which SD family (1.x, 2.x, XL) is settled when the SD loader reads the file, so a pickled
    checkpoint is not read twice.
    """
    from core.families.registry import IMAGE_FAMILIES

    variant = flux_variant_of(base_model)
    return family_impl(variant if variant is not None else IMAGE_FAMILIES[0])


def detect_image_family(base_model: str, *, allow_pickle: bool = False) -> str:
    """The registry family name of `base_model` (file, diffusers folder or hub id).

    FLUX/Chroma first (`detect_variant`, and a hub pipeline's model_index), then the SD
    detectors (which read a whole pickled checkpoint: prefer `family_for_model` to train).
    """
    variant = flux_variant_of(base_model)
    if variant is not None:
        return variant
    from core.models.sd import model_family

    return model_family(base_model, allow_pickle=allow_pickle)


def _hub_flux_variant(repo: str) -> str | None:
    """A hub id's FLUX variant from its (cached) model_index.json and transformer config, else None."""
    from diffusers import DiffusionPipeline

    from core.families.flux_load import _offline, variant_from_folder_configs

    try:
        index = dict(DiffusionPipeline.load_config(repo, local_files_only=_offline()))
    except Exception:  # noqa: BLE001 - not a reachable pipeline: the SD loader reports what is wrong with it
        return None
    if not any(word in str(index.get("_class_name", "")) for word in ("Flux", "Chroma")):
        return None
    try:
        transformer = dict(DiffusionPipeline.load_config(repo, subfolder="transformer", local_files_only=_offline()))
    except (OSError, ValueError):
        transformer = {}
    return variant_from_folder_configs(index, transformer)
