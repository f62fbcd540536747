"""What the code needs to know about each image model family, in one table.

A family is one architecture a LoRA is trained for and loaded into: SD 1.x, SD 2.x, SDXL,
FLUX.1-dev, FLUX.1-schnell, Chroma. This module holds the facts that are plain data (names,
sizes, file labels, defaults); the family modules hold the behaviour (`core.families.sd`
for the UNet families, `core.families.flux` for the flow-matching transformers). Code
outside `core/families/` asks `family_info(name)` instead of testing family names.

Standard library only: the config check, the form and the memory estimate read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    """The data of one family. `kind` says which training code serves it: "unet" or "flux"."""

    name: str
    label: str
    kind: str
    native_resolution: int
    preset_family: str                    # the `family:` of presets/*.yaml that fit it
    ss_base_model_version: str            # WebUI's family label in the kohya file's metadata
    modelspec_architecture: str           # SAI modelspec.architecture (without "/lora")
    kohya_te_prefixes: tuple[str, ...]    # text encoder prefixes in the kohya/WebUI file
    text_encoders: tuple[str, ...]        # the pipeline's text encoder component names
    pipeline_class: str                   # the diffusers pipeline that makes previews
    hub_repo: str                         # where the configs live on the hub (for single files)
    trained_params: int                   # parameters of the network that gets the LoRA
    frozen_params: int                    # text encoders + VAE
    sample_size_floor: int = 0            # previews never smaller than this (SDXL, FLUX)
    has_guidance_embedding: bool = False  # FLUX.1-dev's distilled guidance input
    default_timestep_sampling: str = ""   # flow-matching families: how noise levels are drawn
    sgm_unet_names: bool = False          # kohya/WebUI UNet keys in SAI's sgm names (SDXL), not diffusers'
    v_prediction_suffix: bool = False     # sd-scripts writes `<version>_v` for a v-prediction model
    modelspec_architecture_v: str = ""    # the architecture of its v-prediction variant, when it differs
    modelspec_implementation: str = "diffusers"

    @property
    def is_flow_matching(self) -> bool:
        return self.kind in ("flux", "dit")


# Published sizes of the real networks (counted from their configs on the meta device; the
# tests check the UNet and FLUX numbers against diffusers).
SD1_UNET, SD2_UNET, SDXL_UNET = 859_520_964, 865_910_724, 2_567_463_684
CLIP_L, OPENCLIP_H, OPENCLIP_G, SD_VAE = 123_060_480, 340_387_840, 694_659_841, 83_653_863
FLUX_DEV, FLUX_SCHNELL, CHROMA = 11_901_408_320, 11_891_178_560, 8_899_983_424
T5_XXL_ENCODER, FLUX_AE = 4_762_310_656, 83_819_683
Z_IMAGE, QWEN3_4B = 6_154_908_736, 4_022_468_096  # ZImageTransformer2DModel; Qwen3Model (no LM head)

FAMILIES: dict[str, FamilyInfo] = {f.name: f for f in (
    FamilyInfo("sd1", "SD 1.x", "unet", 512, "sd1", "sd_v1", "stable-diffusion-v1", ("lora_te",),
               ("text_encoder",), "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               SD1_UNET, CLIP_L + SD_VAE, v_prediction_suffix=True),
    FamilyInfo("sd2", "SD 2.x", "unet", 768, "sd1", "sd_v2", "stable-diffusion-v2-512", ("lora_te",),
               ("text_encoder",), "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1",
               SD2_UNET, OPENCLIP_H + SD_VAE, v_prediction_suffix=True,
               modelspec_architecture_v="stable-diffusion-v2-768-v"),
    FamilyInfo("sdxl", "SDXL", "unet", 1024, "sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base",
               ("lora_te1", "lora_te2"), ("text_encoder", "text_encoder_2"), "StableDiffusionXLPipeline",
               "stabilityai/stable-diffusion-xl-base-1.0", SDXL_UNET, CLIP_L + OPENCLIP_G + SD_VAE,
               sample_size_floor=1024, sgm_unet_names=True,
               modelspec_implementation="https://github.com/Stability-AI/generative-models"),
    FamilyInfo("flux-dev", "FLUX.1-dev", "flux", 1024, "flux", "flux1", "flux-1-dev", ("lora_te1", "lora_te3"),
               ("text_encoder", "text_encoder_2"), "FluxPipeline", "black-forest-labs/FLUX.1-dev",
               FLUX_DEV, CLIP_L + T5_XXL_ENCODER + FLUX_AE, sample_size_floor=512,
               has_guidance_embedding=True, default_timestep_sampling="shift"),
    FamilyInfo("flux-schnell", "FLUX.1-schnell", "flux", 1024, "flux", "flux1", "flux-1-schnell",
               ("lora_te1", "lora_te3"), ("text_encoder", "text_encoder_2"), "FluxPipeline",
               "black-forest-labs/FLUX.1-schnell", FLUX_SCHNELL, CLIP_L + T5_XXL_ENCODER + FLUX_AE,
               sample_size_floor=512, default_timestep_sampling="shift"),
    FamilyInfo("chroma", "Chroma", "flux", 1024, "flux", "chroma", "chroma", ("lora_te3",),
               ("text_encoder",), "ChromaPipeline", "lodestones/Chroma1-HD", CHROMA, T5_XXL_ENCODER + FLUX_AE,
               sample_size_floor=512, default_timestep_sampling="sigmoid"),
    FamilyInfo("z-image-turbo", "Z-Image-Turbo", "dit", 1024, "z-image", "z_image_turbo", "Z-Image", (),
               ("text_encoder",), "ZImagePipeline", "Tongyi-MAI/Z-Image-Turbo", Z_IMAGE, QWEN3_4B + FLUX_AE,
               sample_size_floor=512, default_timestep_sampling="shift",
               modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image"),
    FamilyInfo("z-image", "Z-Image", "dit", 1024, "z-image", "z_image", "Z-Image", (),
               ("text_encoder",), "ZImagePipeline", "Tongyi-MAI/Z-Image", Z_IMAGE, QWEN3_4B + FLUX_AE,
               sample_size_floor=512, default_timestep_sampling="shift",
               modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image"),
)}
IMAGE_FAMILIES = tuple(FAMILIES)
UNET_FAMILIES = tuple(name for name, info in FAMILIES.items() if info.kind == "unet")


def family_info(name: str) -> FamilyInfo:
    """The facts of family `name`; a clear error for an unknown one."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown model family '{name}'; known: {', '.join(FAMILIES)}.") from None


def family_label(name: str) -> str:
    """A person's name for a family ("SDXL", "FLUX.1-dev"); the raw name for anything else."""
    info = FAMILIES.get(name)
    return info.label if info else {"llm": "LLM", "unknown": "unknown model"}.get(name, name)
