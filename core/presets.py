"""Presets: partial configs in presets/*.yaml merged under the user's own values.

Each preset is written for one (model family, memory tier): `sd15-8gb`, `sdxl-12gb`,
`flux-16gb`, `llm-24gb`, plus `cpu` and `mps`. Besides config keys a preset file has three
keys of its own: `description` (shown in the UI), `family` (a preset family of
core.family_api.registry: sd1 | sdxl | flux, or llm | any) and `memory_gb` (the GPU size it
was written for).

`preset: auto` detects the device (`detect_device`, the one call tests mock) and the
base model (headers only, `core.model_info`), and picks the richest preset of the
model's family that is meant for this GPU's size and that the memory estimate says
fits in its free memory. `describe_choice` turns that choice into the sentence the
Train tab and `train.py` print. Every value stays editable: the user's own values
always win over the preset's.

On a machine without bf16 a preset's bf16 becomes fp16, and without bitsandbytes its
adamw8bit becomes adamw; values the user typed are never changed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core import devices
from core.config import FIELDS, ConfigError, TrainConfig, coerce, config_from_dict, fsdp_refusal
from core.devices import DeviceInfo
from core.memory import MemoryEstimate, estimate_memory, fitting_changes, format_changes, launch_processes
from core.family_api.registry import FALLBACK_FAMILY, FAMILIES, config_groups_of
from core.model_info import ModelInfo, detect_model

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
META_KEYS = ("description", "family", "memory_gb")
NATIVE_RESOLUTION = {name: info.native_resolution for name, info in FAMILIES.items()}
# A "12 GB" card reports about 11.7 GiB, a laptop "8 GB" about 7.6: a tier is meant for a GPU
# whose total memory is at least this share of the tier's size.
TIER_SHARE = 0.9
# Keys an out-of-memory downshift may change in the middle of a run. The LoRA's shape (rank,
# targets, variant), the optimizer and what is trained stay, so the checkpoint still loads.
# FLUX's frozen-base switches are among them (fp8 storage, blocks in CPU memory, NF4): the LoRA stays.
DOWNSHIFT_KEYS = ("batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "resolution",
                  "max_seq_length", "cache_latents", "cache_text_encoder_outputs", "fp8_base", "blocks_to_swap",
                  "base_quantization")
FLOW_KEYS = ("fp8_base", "blocks_to_swap", "base_quantization")


@dataclass(frozen=True)
class PresetInfo:
    name: str
    family: str  # sd1 | sdxl | flux | llm | any
    memory_gb: float
    description: str


@dataclass
class PresetChoice:
    """What `preset: auto` picked, and why."""

    name: str
    values: dict[str, Any]
    reason: str
    device: DeviceInfo
    model: ModelInfo
    estimate: MemoryEstimate | None = None

    @property
    def fits(self) -> bool:
        return self.estimate is None or self.estimate.fits


def detect_device() -> DeviceInfo:
    """The device training will use (see core.devices; tests mock `core.devices.detect_device`).

    A broken driver must not make every config unreadable: it reads as the CPU, named so.
    """
    try:
        return devices.detect_device()
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA driver/runtime mismatch
        total, free = devices.ram_gb()
        return DeviceInfo("cpu", f"CPU (GPU detection failed: {type(exc).__name__}: {exc})", total, free)


# --- reading presets -----------------------------------------------------------------------

def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose one of: auto, {', '.join(preset_names())}.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping of key: value lines.")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """The config values of preset `name` (its description/family/memory_gb removed)."""
    data = _read(name)
    for key in META_KEYS:
        data.pop(key, None)
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise ValueError(f"preset {name!r} has unknown keys: {', '.join(unknown)}.")
    return data


def preset_info(name: str) -> PresetInfo:
    data = _read(name)
    return PresetInfo(name, str(data.get("family", "any")), float(data.get("memory_gb", 0)),
                      str(data.get("description", "")))


def preset_family(model: ModelInfo | str) -> str:
    """The preset family of a model family (the registry's: SD 2.x uses the SD 1.x presets, every
    FLUX.1 / Chroma variant the flux ones); llm for language models."""
    family = model.family if isinstance(model, ModelInfo) else model
    if family == "llm":
        return "llm"
    info = FAMILIES.get(family, FAMILIES[FALLBACK_FAMILY])
    return info.preset_family


def family_presets(family: str) -> list[PresetInfo]:
    """The GPU presets of a preset family, smallest memory tier first."""
    infos = [preset_info(n) for n in preset_names()]
    return sorted((i for i in infos if i.family == family), key=lambda i: i.memory_gb)


def adapt_to_device(values: dict[str, Any], device: DeviceInfo) -> tuple[dict[str, Any], list[str]]:
    """A preset's values made runnable here (bf16 -> fp16, adamw8bit -> adamw), with notes why."""
    values = dict(values)
    notes = []
    if device.kind == "cuda" and values.get("mixed_precision") == "bf16" and not device.bf16:
        values["mixed_precision"] = "fp16"
        notes.append("fp16 because this GPU has no bf16")
    if values.get("optimizer") == "adamw8bit" and not (device.kind == "cuda" and device.bitsandbytes):
        values["optimizer"] = "adamw"
        notes.append("AdamW because 8-bit AdamW needs bitsandbytes on a CUDA GPU"
                     if device.kind == "cuda" else "AdamW (8-bit AdamW needs a CUDA GPU)")
    if values.get("base_quantization") == "nf4" and not (device.kind == "cuda" and device.bitsandbytes):
        # The same memory tier without bitsandbytes: fp8 storage and more blocks in CPU memory.
        values["base_quantization"] = "none"
        values["fp8_base"] = True
        values["blocks_to_swap"] = max(int(values.get("blocks_to_swap") or 0), 40)
        notes.append("fp8 base with 40 blocks in CPU memory because NF4 needs bitsandbytes on a CUDA GPU")
    return values, notes


def loose_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from form/YAML values for estimating only: values it cannot read are left out."""
    typed = {}
    for key, value in values.items():
        if key in FIELDS:
            try:
                typed[key] = coerce(key, value)
            except ValueError:
                continue
    return TrainConfig(**typed)


def _model_for(raw: dict[str, Any]) -> ModelInfo:
    return detect_model(str(raw.get("base_model") or ""), str(raw.get("task_type") or "image-generation"),
                        str(raw.get("gguf_file") or ""))


def _user_values(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != "preset" and v is not None}


# --- choosing --------------------------------------------------------------------------------

def _generic_values(name: str, model: ModelInfo, device: DeviceInfo) -> tuple[dict[str, Any], list[str]]:
    values, notes = adapt_to_device(load_preset(name), device)
    if model.family in NATIVE_RESOLUTION and "resolution" not in values:
        values["resolution"] = NATIVE_RESOLUTION[model.family]
    return values, notes


def _choose_generic(raw: dict[str, Any], device: DeviceInfo, model: ModelInfo, about: str) -> PresetChoice:
    """The cpu / mps preset, with the gentle savings the user has not overridden if RAM is short."""
    user = _user_values(raw)
    values, notes = _generic_values(device.kind, model, device)
    estimate = estimate_memory(loose_config({**values, **user}), model, device)
    if not estimate.fits:  # e.g. SDXL in RAM
        changes, _ = fitting_changes(loose_config({**values, **user}), model, device)
        extra = [(key, old, new) for key, old, new in changes if key not in user]
        if extra:
            values.update({key: new for key, _old, new in extra})
            notes.append(f"{format_changes(extra)} to fit in memory")
            estimate = estimate_memory(loose_config({**values, **user}), model, device)
    if device.kind == "cpu":
        detail = f" ({device.name})" if device.name != "CPU" else ""
        reason = (f"Preset cpu: no CUDA or Apple GPU was found{detail}; {about} trains on the CPU. That works "
                  "but slowly (minutes per step for Stable Diffusion, seconds for a small LLM); predicted "
                  f"peak RAM {estimate.summary()}, {device.free_gb:.0f} GB free.")
    else:
        reason = f"Preset mps: {about} on {device.label}, in full precision; predicted peak {estimate.summary()}."
    reason = _with_notes(reason, notes)
    if not estimate.fits:
        reason += f" That is likely NOT to fit. {estimate.advice}"
    return PresetChoice(device.kind, values, reason, device, model, estimate)


# What a sharded tier turns off: the savings that keep a base on one GPU (fsdp refuses them).
ONE_GPU_SAVINGS = {"fp8_base": False, "base_quantization": "none", "blocks_to_swap": 0}


def choose_preset(raw: dict[str, Any], device: DeviceInfo | None = None,
                  model: ModelInfo | None = None, processes: int | None = None) -> PresetChoice:
    """The richest preset for this device and base model; user values in `raw` stay on top.

    On several GPUs (`processes`, default: this run's launch) a tier that does not fit one GPU
    is tried sharded (distributed: fsdp) before a smaller tier, unless the user chose ddp.
    """
    device = device or detect_device()
    model = model or _model_for(raw)
    processes = launch_processes() if processes is None else processes
    user = _user_values(raw)
    about = f"{model.label}, read from {model.source}" if model.source else model.label
    if device.kind in ("cpu", "mps"):
        return _choose_generic(raw, device, model, about)
    tiers = family_presets(preset_family(model))
    if not tiers:
        raise ValueError(f"no presets for {model.label} in {PRESET_DIR}.")
    skipped: list[str] = []
    for tier in reversed(tiers):
        if tier.memory_gb > 0 and device.total_gb < tier.memory_gb * TIER_SHARE:
            continue  # meant for a bigger GPU
        values, notes = adapt_to_device(load_preset(tier.name), device)
        estimate = estimate_memory(loose_config({**values, **user}), model, device, processes)
        if not estimate.fits and processes > 1 and "distributed" not in user:
            # Sharding replaces the one-GPU savings it cannot combine with (fp8 / 4-bit base, block swap).
            shard_values = {**values, **{k: v for k, v in ONE_GPU_SAVINGS.items() if k in values}, "distributed": "fsdp"}
            as_sharded = loose_config({**shard_values, **user})
            sharded = estimate_memory(as_sharded, model, device, processes)
            if sharded.fits and not fsdp_refusal(as_sharded):
                values, estimate = shard_values, sharded
                notes.append(f"the base sharded over {processes} GPUs (distributed: fsdp): one GPU cannot hold it")
        if estimate.fits:
            reason = f"Preset {tier.name}: {about} on {device.label}; predicted peak {estimate.summary()}."
            if skipped:
                reason += " " + " ".join(skipped)
            return PresetChoice(tier.name, values, _with_notes(reason, notes), device, model, estimate)
        skipped.append(f"{tier.name} was predicted to need {estimate.total_gb:.1f} GB, more than the "
                       f"{estimate.budget_gb:.1f} GB usable.")
    smallest = tiers[0]
    values, notes = adapt_to_device(load_preset(smallest.name), device)
    estimate = estimate_memory(loose_config({**values, **user}), model, device)
    reason = _with_notes(f"Preset {smallest.name}, the smallest for {about}, on {device.label}: predicted peak "
                         f"{estimate.summary()}.", notes)
    reason += f" That is likely NOT to fit in {estimate.budget_gb:.1f} GB. {estimate.advice}"
    return PresetChoice(smallest.name, values, reason, device, model, estimate)


def _with_notes(reason: str, notes: list[str]) -> str:
    if notes:
        reason = reason.rstrip(".") + f" ({'; '.join(notes)})."
    return reason


def apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """Return `raw` with the named preset's values filled in where the user set none.

    `preset: auto` is replaced by the name of the preset it chose, so the config saved
    beside the results says exactly what ran.
    """
    name = str(raw.get("preset") or "")
    if not name:
        return dict(raw)
    if name == "auto":
        choice = choose_preset(raw)
        merged = dict(choice.values)
        merged.update(_user_values(raw))
        merged["preset"] = choice.name
        return merged
    values = load_preset(name)
    if any(k in values for k in ("mixed_precision", "optimizer")):
        values, _ = adapt_to_device(values, detect_device())
    merged = dict(values)
    merged.update(raw)
    return merged


def resolve_config(raw: dict[str, Any] | None, *, check_paths: bool = True) -> TrainConfig:
    """`config_from_dict` with the `preset` merged first, under the user's own values.

    What train.py (and any caller that runs a user's YAML) validates with; core.config
    itself knows nothing of presets. A preset problem is reported with the other keys'
    problems, in the order config_from_dict gives them (unknown keys first).
    """
    raw = dict(raw or {})
    preset_error = ""
    if raw.get("preset"):
        unknown = {k: v for k, v in raw.items() if k not in FIELDS}
        try:
            raw = {**unknown, **apply_preset({k: v for k, v in raw.items() if k in FIELDS})}
        except (ValueError, OSError) as exc:
            preset_error = str(exc)
    try:
        cfg = config_from_dict(raw, check_paths=check_paths)
    except ConfigError as exc:
        if not preset_error:
            raise
        errors = {k: v for k, v in exc.errors.items() if k not in FIELDS}
        errors["preset"] = exc.errors.get("preset", preset_error)
        errors.update({k: v for k, v in exc.errors.items() if k in FIELDS and k != "preset"})
        raise ConfigError(errors) from None
    if preset_error:
        raise ConfigError({"preset": preset_error})
    return cfg


def describe_choice(cfg_raw: dict[str, Any] | TrainConfig, device: DeviceInfo | None = None) -> str:
    """One sentence for the UI and train.py: which preset, why, and the predicted peak memory.

    Works for `preset: auto`, a named preset (with a warning when it is meant for another
    model family or a bigger GPU) and no preset (the estimate of the user's own values).
    """
    raw = cfg_raw.to_dict() if isinstance(cfg_raw, TrainConfig) else dict(cfg_raw)
    name = str(raw.get("preset") or "")
    device = device or detect_device()
    model = _model_for(raw)
    if name == "auto":
        return choose_preset(raw, device, model).reason
    if not name:
        estimate = estimate_memory(loose_config(_user_values(raw)), model, device)
        text = f"No preset: {model.label} on {device.label}; predicted peak {estimate.summary()}."
        return text if estimate.fits else f"{text} That is likely NOT to fit. {estimate.advice}"
    info = preset_info(name)
    values, notes = adapt_to_device(load_preset(name), device)
    estimate = estimate_memory(loose_config({**values, **_user_values(raw)}), model, device)
    text = _with_notes(f"Preset {name}: {info.description} Predicted peak on {device.label}: "
                       f"{estimate.summary()}.", notes)
    if info.family not in ("any", preset_family(model)):
        text += f" Note: this preset is meant for {info.family.upper()} models, but the base model is {model.label}."
    if device.kind == "cuda" and info.memory_gb and device.total_gb < info.memory_gb * TIER_SHARE:
        text += f" It is meant for a {info.memory_gb:g} GB GPU."
    if not estimate.fits:
        text += f" That is likely NOT to fit. {estimate.advice}"
    return text


# --- smaller presets (out-of-memory recovery) ----------------------------------------------------

def current_tier(cfg: TrainConfig, model: ModelInfo) -> float:
    """The memory tier `cfg` runs at: its preset's, else the largest tier its estimate fits under."""
    if cfg.preset and cfg.preset not in ("auto", "cpu", "mps"):
        try:
            info = preset_info(cfg.preset)
            if info.family == preset_family(model):
                return info.memory_gb
        except ValueError:
            pass
    return float("inf")


def next_smaller_preset(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo
                        ) -> tuple[str, dict[str, Any]] | None:
    """The next smaller preset's downshift values that lower the predicted peak, or None.

    Only DOWNSHIFT_KEYS change (the LoRA's shape and the optimizer stay, so the last
    checkpoint loads); gradient_accumulation_steps grows so the effective batch stays
    the same and the step count and schedule do not move.
    """
    if device.kind in ("cpu", "mps"):
        return None
    before = estimate_memory(cfg, model, device).total_gb
    if cfg.distributed == "ddp" and launch_processes() > 1 and not fsdp_refusal(replace_config(cfg, "fsdp")):
        # More GPUs share the base before anything is made smaller (a checkpoint resumes across the two).
        if estimate_memory(replace_config(cfg, "fsdp"), model, device).total_gb < before:
            return "sharded", {"distributed": "fsdp"}
    tier = current_tier(cfg, model)
    for info in reversed(family_presets(preset_family(model))):
        if info.memory_gb >= tier:
            continue
        values = {k: v for k, v in load_preset(info.name).items() if k in DOWNSHIFT_KEYS}
        if cfg.is_image:
            values.pop("max_seq_length", None)
        else:
            for key in ("resolution", "cache_latents", "cache_text_encoder_outputs"):
                values.pop(key, None)
        if "flow" not in config_groups_of(model.family):
            for key in FLOW_KEYS:
                values.pop(key, None)
        values = {k: v for k, v in values.items() if _saves_memory(k, v, getattr(cfg, k))}
        values.pop("gradient_accumulation_steps", None)
        if "batch_size" in values:
            effective = cfg.batch_size * cfg.gradient_accumulation_steps
            values["gradient_accumulation_steps"] = max(1, round(effective / values["batch_size"]))
        changes = {k: v for k, v in values.items() if getattr(cfg, k) != v}
        if not changes:
            continue
        smaller = dataclasses.replace(cfg, **changes)
        if estimate_memory(smaller, model, device).total_gb < before:
            changes["preset"] = info.name
            return info.name, changes
    return None


def replace_config(cfg: TrainConfig, distributed: str) -> TrainConfig:
    return dataclasses.replace(cfg, distributed=distributed)


def _saves_memory(key: str, new: Any, old: Any) -> bool:
    """A downshift only ever saves: a switch that saves memory (checkpointing, caches, fp8) is only
    turned on, a number the user already set lower stays, more blocks go to CPU memory, never
    fewer, and the base is quantized, never de-quantized."""
    if key == "blocks_to_swap":
        return int(new) > int(old)
    if key == "base_quantization":
        return new != "none" and old == "none"
    if isinstance(new, bool):
        return new is True and old is False
    return isinstance(new, int) and new < old


def downshift_summary(cfg: TrainConfig, changes: dict[str, Any]) -> str:
    """'batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2' for the log and the advice."""
    return format_changes([(k, getattr(cfg, k), v) for k, v in changes.items() if k != "preset"])
