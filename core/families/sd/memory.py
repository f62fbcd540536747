"""Predicted memory of an SD 1.x / 2.x / SDXL LoRA run, by part (the registry rows' `memory_parts`).

The activation numbers are bench/memory_calibration.py's: the real UNets from their published configs on
the `meta` device, every tensor autograd saves for the backward pass counted (see core/memory.py).
"""
from __future__ import annotations

from core.config import TrainConfig
from core.devices import GIB, DeviceInfo
from core.family_api.registry import SD_VAE
from core.model_info import ModelInfo

KIB = 1024

# Bytes autograd saves per latent pixel per image, in a 16-bit dtype (bench/memory_calibration.py):
# (no checkpointing, with checkpointing, largest checkpointed block recomputed, largest single tensor).
UNET_ACTIVATION = {
    "sd1": (190.1 * KIB, 35.6 * KIB, 14.5 * KIB, 5.0 * KIB),
    "sd2": (179.7 * KIB, 25.2 * KIB, 14.5 * KIB, 5.0 * KIB),  # last two: SD 1.x's (same block layout)
    "sdxl": (333.0 * KIB, 29.1 * KIB, 7.5 * KIB, 2.5 * KIB),
}
# Sum of (in + out) features over the LoRA targets (to_q/k/v/out.0 of the UNet; q/k/v/out_proj of
# the text encoders): LoRA parameters = rank x this.
UNET_LORA_FEATURES = {"sd1": 199_296, "sd2": 207_488, "sdxl": 1_451_520}
# The same for LoCon (conv_rank): sum of (in x k x k + out) over the ResNet and sampler convs
# (core.families.sd.lora.conv_module_names) of the real UNets, counted on the meta device.
UNET_CONV_LORA_FEATURES = {"sd1": 578_560, "sd2": 578_560, "sdxl": 378_880}
TE_LORA_FEATURES = {"sd1": 73_728, "sd2": 196_608, "sdxl": 73_728 + 327_680}
# Activations of a text encoder being trained, per caption (77 tokens), in a 16-bit dtype.
TE_ACTIVATION = {"sd1": 0.04 * GIB, "sd2": 0.1 * GIB, "sdxl": 0.2 * GIB}


def unet_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, *, compute_bytes: int, lora_state_bytes: int,
               cached_images: int) -> dict[str, float]:
    """The parts of an SD 1.x / 2.x / SDXL run in bytes (core.memory adds the runtime overhead)."""
    family = model.family if model.family in UNET_ACTIVATION else "sd1"
    size = compute_bytes
    scale = size / 2 * model.width / 320  # tiny test UNets are narrower than the real ones
    pixels = (cfg.resolution // 8) ** 2 * cfg.batch_size
    kept, kept_gc, block, largest = UNET_ACTIVATION[family]
    parts: dict[str, float] = {"UNet weights": model.params * size}
    text_encoders = max(0, model.extra_params - SD_VAE)
    caching_latents = cfg.cache_latents and cfg.center_crop and not cfg.random_flip
    if cfg.train_text_encoder or not cfg.cache_text_encoder_outputs:
        parts["text encoder weights"] = text_encoders * size
    if not caching_latents:
        # The VAE runs in fp32 (an fp16 SD VAE can overflow); it encodes before the UNet's pass.
        parts["VAE weights"] = SD_VAE * 4
    lora = (UNET_LORA_FEATURES[family] * cfg.lora_rank + UNET_CONV_LORA_FEATURES[family] * cfg.conv_rank) \
        * model.width / 320
    if cfg.train_text_encoder:
        lora += TE_LORA_FEATURES[family] * cfg.lora_rank
    parts["LoRA + optimizer"] = lora * lora_state_bytes
    if cfg.gradient_checkpointing:
        # What the checkpoints keep, plus one block recomputed during the backward pass.
        activations = pixels * (kept_gc + block) * scale
    else:
        activations = pixels * kept * scale
    if cfg.lora_variant == "dora":
        activations *= 1.15  # DoRA keeps the merged weight norm of every adapted layer
    if cfg.train_text_encoder:
        activations += TE_ACTIVATION[family] * cfg.batch_size * size / 2
    parts["activations"] = activations
    parts["backward transient"] = 3 * pixels * largest * scale
    if not caching_latents:
        vae_encode = 4 * 128 * cfg.resolution**2 * cfg.batch_size * 4
        parts["backward transient"] = max(parts["backward transient"], vae_encode - activations)
    if caching_latents and device.kind != "cuda":
        # Cached latents (VAE mean + logvar, fp32) live in RAM: they count where RAM is the memory.
        parts["cached latents"] = cached_images * 8 * (cfg.resolution // 8) ** 2 * 4
    return parts
