"""Out-of-memory and NaN handling around a training run.

`train_with_recovery(train_fn, cfg, ctx)` runs `train_fn(cfg, ctx)` (the image or text
loop) and:

- before the run, logs the predicted peak memory, warns when it is not expected to
  fit, and says plainly when training runs on the CPU;
- on out of memory (`torch.OutOfMemoryError`, a RuntimeError saying "out of memory",
  `MemoryError`) frees memory, then either raises `OutOfMemoryAdvice` naming the exact
  settings to change (the next smaller preset's values), or, with
  `auto_downshift: true`, resumes from the last checkpoint with those values and a
  WarningEvent that says so;
- lets `NonFiniteLossError` (a NaN/inf loss) through with its advice, which `Job`
  turns into an ErrorEvent.

The loops save checkpoints every `save_steps`, so a downshift loses at most the steps
since the last one; the effective batch (batch x accumulation) stays the same, so the
step count and the learning-rate schedule continue where they were.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any
from collections.abc import Callable

from core.config import TrainConfig
from core.devices import DeviceInfo, free_memory, is_out_of_memory
from core.events import Event, ProgressEvent, RunContext
from core.model_info import ModelInfo, detect_model
from core.train import checkpoints

TrainFn = Callable[[TrainConfig, RunContext], dict[str, Any]]
MAX_DOWNSHIFTS = 6


class OutOfMemoryAdvice(RuntimeError):
    """The run ran out of memory; `advice` names the settings to change, `changes` holds them."""

    def __init__(self, message: str, advice: str, changes: dict[str, Any] | None = None, step: int = 0):
        super().__init__(message)
        self.advice = advice
        self.changes = dict(changes or {})
        self.step = step


class _StepTracker:
    """Listens to the run's events to know the last finished step."""

    def __init__(self) -> None:
        self.last_step = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, ProgressEvent) and event.total:
            self.last_step = max(self.last_step, int(event.step))


def preflight(cfg: TrainConfig, ctx: RunContext, device: DeviceInfo, model: ModelInfo) -> None:
    """Log the memory estimate; warn before a run that will not fit, and on the CPU."""
    from core.memory import estimate_memory

    estimate = estimate_memory(cfg, model, device)
    ctx.log(f"Memory: {model.label} on {device.label}; predicted peak {estimate.summary()}.")
    if device.kind == "cpu":
        ctx.warn("Training on the CPU: no CUDA or Apple GPU was found. It works, but slowly (minutes per "
                 "step for Stable Diffusion, seconds for a small LLM).",
                 "For speed use a machine with an NVIDIA GPU; here keep the cpu preset (preset: cpu) and "
                 "small data, or set max_train_steps.")
    if not estimate.fits:
        extra = (" auto_downshift is on: if it runs out of memory, it continues from the last checkpoint "
                 "with smaller settings.") if cfg.auto_downshift else " Or set auto_downshift: true."
        ctx.warn(f"Predicted peak memory {estimate.total_gb:.1f} GB is more than the {estimate.budget_gb:.1f} GB "
                 f"usable on {device.label}: this run will probably run out of memory.",
                 estimate.advice + extra)


def oom_advice(cfg: TrainConfig, model: ModelInfo, device: DeviceInfo) -> tuple[str, dict[str, Any]]:
    """What to change after an out-of-memory error: the next smaller preset, else gentler steps."""
    from core import presets
    from core.memory import USABLE_SHARE, estimate_memory, fitting_changes, format_changes

    shift = presets.next_smaller_preset(cfg, model, device)
    if shift is not None:
        name, changes = shift
        return f"{presets.downshift_summary(cfg, changes)} (preset {name})", changes
    # No smaller preset: ask for about a quarter less memory than this config was predicted to need.
    target = estimate_memory(cfg, model, device).total_gb * 0.75
    tighter = dataclasses.replace(device, free_gb=target / USABLE_SHARE)
    # Only values a resumed run can change: the checkpoint's LoRA shape and optimizer state must still load.
    safe = (*presets.DOWNSHIFT_KEYS, "mixed_precision")
    steps = [step for step in fitting_changes(cfg, model, tighter)[0] if step[0] in safe]
    if steps:
        return format_changes(steps), {key: new for key, _old, new in steps}
    return "", {}


def distributed() -> bool:
    """True inside a multi-process run (torchrun / accelerate launch with several processes)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _resume_value(cfg: TrainConfig) -> str:
    """Continue from this run's newest checkpoint; without one, from what the run started from."""
    return "latest" if checkpoints.latest_checkpoint(cfg.output_dir) is not None else cfg.resume_from


def train_with_recovery(train_fn: TrainFn, cfg: TrainConfig, ctx: RunContext, *,
                        device: DeviceInfo | None = None, model: ModelInfo | None = None) -> dict[str, Any]:
    """Run `train_fn(cfg, ctx)`; on out of memory stop with advice or downshift and resume."""
    from core import presets

    try:
        device = device or presets.detect_device()
        model = model or detect_model(cfg.base_model, cfg.task_type, cfg.gguf_file)
        preflight(cfg, ctx, device, model)
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run
        ctx.log(f"Memory estimate unavailable: {type(exc).__name__}: {exc}")
        device = device or DeviceInfo("cpu", "CPU", 0.0, 0.0)
        model = model or ModelInfo("unknown", 0, "")

    for attempt in range(MAX_DOWNSHIFTS + 1):
        tracker = _StepTracker()
        ctx.listeners.append(tracker)
        failure = ""
        try:
            return train_fn(cfg, ctx)
        except BaseException as exc:
            if not is_out_of_memory(exc):
                raise
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'out of memory'}"
        finally:
            ctx.listeners.remove(tracker)
        # Outside the except block: the exception and the frames holding the run's tensors are gone.
        free_memory(reset_peak=True)  # the next attempt measures its own peak
        step = tracker.last_step + 1
        where = f"at step {step}" if tracker.last_step else "before the first step finished"
        checkpoint = checkpoints.latest_checkpoint(cfg.output_dir)
        saved = (f"The last checkpoint is {checkpoint} (step {checkpoint.name.split('-')[-1].lstrip('0') or 0})."
                 if checkpoint is not None else "No checkpoint was saved yet.")
        settings, changes = oom_advice(cfg, model, device)
        if not changes:
            raise OutOfMemoryAdvice(
                f"Out of memory {where} on {device.label} ({failure}). {saved}",
                f"Even the smallest settings for {model.label} do not fit: use a smaller base model or a GPU "
                "with more memory.", {}, step)
        if distributed():
            # The other processes are still waiting in the same step: all must restart together.
            raise OutOfMemoryAdvice(
                f"Out of memory {where} on {device.label} ({failure}) in a multi-GPU run. {saved}",
                f"Change {settings} in the config, then start all processes again with resume_from: latest.",
                changes, step)
        if not cfg.auto_downshift or attempt == MAX_DOWNSHIFTS:
            raise OutOfMemoryAdvice(
                f"Out of memory {where} on {device.label} ({failure}). {saved}",
                f"Change {settings}, then resume with resume_from: latest."
                + ("" if cfg.auto_downshift else " Or set auto_downshift: true to do this automatically."),
                changes, step)
        resume = _resume_value(cfg)
        ctx.warn(f"Out of memory {where} on {device.label}. Continuing "
                 f"{'from the last checkpoint' if resume == 'latest' else 'from where it started'} with smaller "
                 f"settings: {settings}.",
                 "These values are saved in config.yaml in the output folder; use them for the next run.")
        cfg = dataclasses.replace(cfg, **changes, resume_from=resume)
    raise AssertionError("unreachable")  # the loop either returns or raises
