"""The one interface between the image training path and a model family's behaviour.

`ImageRun` (core.train.image), its outputs (core.train.image_outputs), the previews
(core.sample) and the LoRA tools ask an `ImageFamily` for everything that differs between
families, and never test a family's name themselves. `ImageFamily` is a frozen dataclass of
plain functions; each registry row names the module holding its instance (`impl`, attribute
`FAMILY`): `core.families.sd.family.SD`, `core.families.flux.family.FLUX`, ...; `core.family_api.lookup`
picks one by a registry name or by a model's files.

It sits below the engine: the standard library and `core.config` only (torch types are named for the
type checker, never imported).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import TrainConfig

if TYPE_CHECKING:  # the contract names torch types but never imports torch (it sits below the engine)
    import torch
    from torch import nn

Log = Callable[[str], None]


class ModelLoadError(ValueError):
    """A base model could not be loaded; the message says which file and what to do."""

    def __init__(self, message: str, advice: str = ""):
        super().__init__(message)
        self.advice = advice


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
    control: torch.Tensor | None = None                      # [B, C, h, w] control latents (needs_control families)
    # Every reference's latents in order, [B, C, h, w] each (control first; `max_references` families); the
    # batch's items all have as many (the sampler batches by their count); [] for text-to-image items.
    references: list[torch.Tensor] = field(default_factory=list)


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
class BaseWeights:
    """A base model opened for the LoRA tools that read or rewrite its weights (bake a LoRA in, extract
    a LoRA, DoRA -> LoRA): the modules a LoRA can change, by the component names of its files."""

    family: str                                          # the registry name of the loaded model
    components: dict[str, nn.Module]                     # "unet", "text_encoder", "text_encoder_2", ...
    # save dtype (None: as loaded) -> the whole checkpoint in the layout WebUI / ComfyUI load.
    to_single_file: Callable[[torch.dtype | None], dict[str, torch.Tensor]]


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
    network: Callable[[Any], nn.Module]                # the network that gets the LoRA (None while deferred)
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
    # Loads the network when `load` put it off (training calls it once the latents and captions are cached
    # and the encoders freed, so the peak is not all parts at once); None: `load` loads it.
    load_network: Callable[[Any], None] | None = None
    # (vae, pixels [B, 3, H, W] in [-1, 1]) -> latent moments [B, 2C, h, w]: what the latent cache stores.
    encode_moments: Callable[[Any, torch.Tensor], torch.Tensor] = vae_moments
    normalize_latents: Callable[[Any, torch.Tensor], torch.Tensor] = normalize_latents
    denormalize_latents: Callable[[Any, torch.Tensor], torch.Tensor] = denormalize_latents
    lora_files: LoraFileFormat | None = None            # None: the tools' SD (kohya UNet) handling
    # A single file's tensor names (its header alone, the ComfyUI prefix removed) -> the registry family, when
    # the names tell the family's variants apart; else `detect` reads the file.
    variant_from_keys: Callable[[Any], str | None] | None = None
    # The fallback family (the first registry row) names any model it serves: (base_model, allow_pickle) -> name.
    identify: Callable[[str, bool], str] | None = None
    # The LoRA tools' view of a base model: (base_model, *, allow_pickle, model_config) -> BaseWeights;
    # None: the family's checkpoints are not rewritten by the tools (its LoRAs load beside the model).
    open_base_weights: Callable[..., BaseWeights] | None = None
