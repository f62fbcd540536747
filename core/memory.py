"""Predicted peak memory of a training config, so a run that will not fit is flagged first.

The estimate is a sum of parts a user can act on: frozen weights in their dtype, the
LoRA parameters with their gradients and optimizer state, the activations kept for the
backward pass (by resolution x batch, or tokens, with or without gradient
checkpointing), a transient for the backward pass itself, and cached latents.

Where the activation numbers come from: `bench/memory_calibration.py` runs the real
architectures (SD 1.5 / SDXL UNets from their published configs, Llama-shaped decoders)
on the `meta` device, with LoRA-like trainable attention weights and flash-style
attention, and adds up every tensor autograd saves for the backward pass. That count
is exact for what autograd keeps and linear in the number of latent pixels (or
tokens); it is what `torch.cuda.max_memory_allocated` sees, minus allocator slack.
The numbers below are those measurements; CUDA peaks are not measured yet (no GPU was
available), see the README. Each image family has its own parts (the `memory_parts` of its registry
row: core.families.sd.memory for the UNets, core.families.flux.memory for FLUX.1 / Chroma, ...);
here are the parts every run shares and the LLM's.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from core.config import TrainConfig
from core import devices
from core.devices import GIB, DeviceInfo
from core.family_api.registry import FAMILIES, IMAGE_FAMILIES
from core.model_info import ModelInfo, detect_model

KIB = 1024

# Per LoRA parameter: fp32 weight + fp32 gradient + optimizer state.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 1, "sgd": 4}
# Allocator rounding, cuBLAS/cuDNN workspaces and the like, outside the parts above.
RUNTIME_OVERHEAD_GB = 0.25
# Share of the free memory a run may plan to use (fragmentation of the caching allocator).
USABLE_SHARE = 0.92
# The trained network's weights, which `distributed: fsdp` splits over the processes (the text
# encoders and the VAE run before training, whole, as in one process).
SHARDED_PARTS = ("UNet weights", "transformer weights", "model weights")


def launch_processes() -> int:
    """How many processes this run trains in: WORLD_SIZE inside `accelerate launch` / torchrun, else 1."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def shard_parts(parts: dict[str, float], cfg: TrainConfig, model: ModelInfo, processes: int) -> dict[str, float]:
    """Per-GPU parts of a sharded run: 1/N of the network's weights, plus the blocks gathered whole
    while they run (the one computing and the next one arriving); a DDP run keeps them all."""
    if cfg.distributed != "fsdp" or processes <= 1:
        return parts
    for key in SHARDED_PARTS:
        if key in parts:
            whole = parts[key]
            units = max(8, model.num_layers or 16)
            parts[key] = whole / processes
            parts["gathered blocks (fsdp)"] = 2 * whole / units
    return parts


@dataclass
class MemoryEstimate:
    """Predicted peak memory in GiB, by part; `fits` compares it with the device's free memory."""

    total_gb: float
    parts: dict[str, float] = field(default_factory=dict)
    fits: bool = True
    advice: str = ""
    budget_gb: float = 0.0

    def describe(self) -> str:
        """'about 6.9 GB (...) of 11.0 GB usable' plus the advice when it does not fit."""
        text = f"{self.summary()} of {format_gb(self.budget_gb)} usable"
        return text if self.fits else f"{text}: likely NOT to fit. {self.advice}"

    def parts_text(self) -> str:
        """'weights 2.1, activations 3.0' in GB; a tiny model's parts in MB ('weights 12 MB'); '' when none."""
        if self.total_gb >= 0.1:
            return ", ".join(f"{name} {gb:.1f}" for name, gb in self.parts.items() if gb >= 0.05)
        return ", ".join(f"{name} {format_gb(gb)}" for name, gb in self.parts.items() if gb * 1024 >= 0.5)

    def summary(self) -> str:
        parts = self.parts_text()
        total = format_gb(self.total_gb)
        return (total if total.startswith("under") else f"about {total}") + (f" ({parts})" if parts else "")


def format_gb(gb: float) -> str:
    """GiB in words a person reads: '6.9 GB', but '35 MB' for a tiny model (never '0.0 GB')."""
    if gb >= 0.1:
        return f"{gb:.1f} GB"
    mb = gb * 1024
    return f"{mb:.0f} MB" if mb >= 1 else "under 1 MB"


def dtype_bytes(cfg: TrainConfig, device: DeviceInfo | None = None) -> int:
    if device is not None and device.kind == "cpu" and cfg.mixed_precision == "fp16":
        return 4  # fp16 autocast is not used on the CPU
    return 2 if cfg.mixed_precision in ("fp16", "bf16") else 4


def usable_gb(device: DeviceInfo) -> float:
    """Memory a run may plan to use: the free memory less allocator slack."""
    return max(0.0, device.free_gb * USABLE_SHARE)


def _lora_state_bytes(cfg: TrainConfig, device: DeviceInfo) -> int:
    optimizer = cfg.optimizer
    if optimizer == "adamw8bit" and not (device.kind == "cuda" and device.bitsandbytes):
        optimizer = "adamw"  # build_optimizer falls back to AdamW there
    return 8 + OPTIMIZER_STATE_BYTES.get(optimizer, 8)


def _count_images(folder: str) -> int:
    path = Path(folder) if folder else None
    if path is None or not path.is_dir():
        return 0
    from core.data.image_io import IMAGE_EXTENSIONS

    count = 0
    for child in path.iterdir():
        if child.suffix.lower() in IMAGE_EXTENSIONS:
            count += 1
            if count >= 100_000:
                break
    return count


def _text_parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo) -> dict[str, float]:
    size = dtype_bytes(cfg, device)
    h, layers = model.hidden_size or 2048, model.num_layers or 24
    inter, vocab = model.intermediate_size or 4 * h, model.vocab_size or 32000
    kv_dim = model.kv_dim or h
    tokens = cfg.batch_size * cfg.max_seq_length
    parts: dict[str, float] = {"model weights": model.params * size}
    lora = cfg.lora_rank * layers * (9 * h + 2 * kv_dim + 3 * inter)
    parts["LoRA + optimizer"] = lora * _lora_state_bytes(cfg, device)
    # Measured (bench/memory_calibration.py): within 7% in bf16 on three decoder shapes, 10% high in fp32.
    per_token_layer = (10 * h + 4 * inter) * size
    if cfg.gradient_checkpointing:
        activations = tokens * layers * 2 * h * size + tokens * per_token_layer
    else:
        activations = tokens * layers * per_token_layer
    if cfg.lora_variant == "dora":
        activations += (model.params - vocab * h) * size  # DoRA materialises each adapted weight
    parts["activations"] = activations
    # The loss keeps fp32 log-probabilities; its backward adds their gradient and the logits'.
    parts["logits + loss"] = tokens * vocab * (12 + size)
    parts["backward transient"] = 2 * tokens * inter * size + cfg.batch_size * cfg.max_seq_length**2 * size
    return parts


def _family_parts(model: ModelInfo) -> Callable[..., dict[str, float]]:
    """The image family's own parts function (`memory_parts` of its registry row); an image model of no
    known family is estimated as the first row's (SD 1.x)."""
    info = FAMILIES.get(model.family) or FAMILIES[IMAGE_FAMILIES[0]]
    module, function = info.memory_parts.split(":")
    return getattr(importlib.import_module(module), function)


def _parts(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo, processes: int | None = None
           ) -> dict[str, float]:
    """Every part in bytes, per process (`processes`: the launch's count, by default this run's)."""
    if model.family == "llm":
        parts = _text_parts(cfg, model, device)
    else:
        caching = cfg.cache_latents and cfg.center_crop and not cfg.random_flip
        parts = _family_parts(model)(
            cfg, model, device, compute_bytes=dtype_bytes(cfg, device), lora_state_bytes=_lora_state_bytes(cfg, device),
            cached_images=_count_images(cfg.train_data_dir) if caching and device.kind != "cuda" else 0)
    parts["runtime overhead"] = RUNTIME_OVERHEAD_GB * GIB if device.kind == "cuda" else 0.0
    return shard_parts(parts, cfg, model, launch_processes() if processes is None else processes)


def estimate_memory(cfg: TrainConfig, model: ModelInfo | None = None,
                    device: DeviceInfo | None = None, processes: int | None = None) -> MemoryEstimate:
    """Predicted peak memory of training `cfg` on `device`, by part, with what to change if too big.

    Without `model` / `device` they are detected (headers of cfg.base_model; this machine).
    `processes`: how many GPUs the run is launched on (default: this run's, 1 outside a launch);
    with `distributed: fsdp` the network's weights are counted per GPU.
    """
    if model is None:
        model = detect_model(cfg.base_model, cfg.task_type, cfg.gguf_file)
    if device is None:
        device = devices.detect_device()
    gb = {name: value / GIB for name, value in _parts(cfg, model, device, processes).items()}
    total = sum(gb.values())
    budget = usable_gb(device)
    estimate = MemoryEstimate(total_gb=total, parts=gb, fits=total <= budget, budget_gb=budget)
    if not estimate.fits:
        estimate.advice = fitting_changes_advice(cfg, model, device)
    return estimate


# --- what to change --------------------------------------------------------------------------

Change = tuple[str, Any, Any]  # (key, old value, new value)


def _candidate_steps(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo) -> list[Callable[[TrainConfig], dict]]:
    """Changes that save memory without changing what is learned, the gentlest first."""
    steps: list[Callable[[TrainConfig], dict]] = []
    steps.append(lambda c: {"gradient_checkpointing": True} if not c.gradient_checkpointing else {})
    if device.kind == "cuda":
        steps.append(lambda c: {"mixed_precision": "bf16" if device.bf16 else "fp16"}
                     if c.mixed_precision == "no" else {})
        if device.bitsandbytes:
            steps.append(lambda c: {"optimizer": "adamw8bit"} if c.optimizer == "adamw" else {})
    if model.family != "llm":
        steps.append(lambda c: {"cache_text_encoder_outputs": True, "train_text_encoder": False}
                     if c.train_text_encoder or not c.cache_text_encoder_outputs else {})
        steps.append(lambda c: {"cache_latents": True, "random_flip": False, "center_crop": True}
                     if not (c.cache_latents and c.center_crop and not c.random_flip) else {})
    if FAMILIES.get(model.family) and FAMILIES[model.family].is_flow_matching and device.kind == "cuda":
        # fp8 storage, then blocks in CPU memory, then NF4: none changes the LoRA's shape.
        if device.bf16:
            steps.append(lambda c: {"fp8_base": True} if not c.fp8_base and c.base_quantization == "none" else {})
        for _ in range(5):
            steps.append(lambda c: {"blocks_to_swap": c.blocks_to_swap + 8} if c.blocks_to_swap < 40 else {})
        if device.bitsandbytes:
            steps.append(lambda c: {"base_quantization": "nf4"} if c.base_quantization == "none" else {})

    def halve_batch(c: TrainConfig) -> dict:
        if c.batch_size <= 1:
            return {}
        new = c.batch_size // 2
        return {"batch_size": new, "gradient_accumulation_steps":
                max(1, round(c.batch_size * c.gradient_accumulation_steps / new))}

    for _ in range(6):
        steps.append(halve_batch)
    if model.family == "llm":
        for _ in range(4):
            steps.append(lambda c: {"max_seq_length": c.max_seq_length // 2} if c.max_seq_length > 256 else {})
    else:
        # Last resort (it changes what the LoRA sees): down to the family's floor (768 SDXL, 512 FLUX, 384 SD 1.x/2.x).
        info = FAMILIES.get(model.family)
        floor = info.resolution_floor if info else 384
        for _ in range(4):
            steps.append(lambda c: {"resolution": max(floor, c.resolution - 128)} if c.resolution > floor else {})
    return steps


def fitting_changes(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo) -> tuple[list[Change], bool]:
    """The fewest gentle changes (in order) after which `cfg` is predicted to fit; and whether it does."""
    current = cfg
    changes: dict[str, list[Any]] = {}
    for step in _candidate_steps(cfg, model, device):
        if estimate_total(current, model, device) <= usable_gb(device):
            break
        update = {k: v for k, v in step(current).items() if getattr(current, k) != v}
        if not update:
            continue
        for key, value in update.items():
            changes.setdefault(key, [getattr(cfg, key), value])[1] = value
        current = dataclasses.replace(current, **update)
    fits = estimate_total(current, model, device) <= usable_gb(device)
    return [(k, old, new) for k, (old, new) in changes.items() if old != new], fits


def estimate_total(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo) -> float:
    return sum(_parts(cfg, model, device).values()) / GIB


def format_changes(changes: list[Change]) -> str:
    """'batch_size 4 -> 2, gradient_checkpointing off -> on'."""
    def show(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    return ", ".join(f"{key} {show(old)} -> {show(new)}" for key, old, new in changes)


def fitting_changes_advice(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo) -> str:
    changes, fits = fitting_changes(cfg, model, device)
    if changes and fits:
        return f"Change {format_changes(changes)} to fit in {format_gb(usable_gb(device))}."
    if changes:
        return (f"Even with {format_changes(changes)} it is predicted not to fit in {format_gb(usable_gb(device))}: "
                f"use a smaller base model than {model.label}, or a device with more memory.")
    return (f"{model.label} alone needs more than the {usable_gb(device):.1f} GB available: use a smaller "
            "base model, or a device with more memory.")
