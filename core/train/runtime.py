"""Pieces every training loop shares (image and text): the run folder, checkpoints and
resume, loss.csv + TensorBoard, optimizer and scheduler, the progress meter and the
NaN guard. Small pure helpers with explicit parameters, in the nanoGPT spirit.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from core.atomic import atomic_dir, atomic_write_text, is_complete_dir
from core.config import TrainConfig, save_config
from core.events import ProgressEvent, RunContext

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^step-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training on would only produce garbage."""

    def __init__(self, step: int, cfg: TrainConfig):
        self.step = step
        bf16 = " switch mixed_precision to bf16 (fp16 overflows more easily)," if cfg.mixed_precision == "fp16" else ""
        self.advice = (f"Lower learning_rate (now {cfg.learning_rate:g}, try {cfg.learning_rate / 4:g}),{bf16} "
                       "keep max_grad_norm at 1.0, or train fewer steps. Resume from the last checkpoint "
                       "with resume_from: latest.")
        super().__init__(f"The loss became NaN/inf at step {step}; the run was stopped so it does not "
                         "train on garbage.")


# --- the run folder ----------------------------------------------------------------------

def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Create output_dir and save the exact config that runs there."""
    out = Path(cfg.output_dir)
    (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    clear_unfinished(out / CHECKPOINT_DIR)
    (out / "samples").mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def clear_unfinished(folder: Path) -> None:
    """Remove temporary folders a killed run left behind (never counted as checkpoints)."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith(".") and (child.name.endswith(".tmp") or ".old-" in child.name):
            shutil.rmtree(child, ignore_errors=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --- checkpoints -------------------------------------------------------------------------

def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; half-written ones (no marker) are skipped."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _CKPT_RE.match(child.name)
            if match and child.is_dir() and is_complete_dir(child):
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": repr(random.getstate()),
        "numpy": json.dumps([np.random.get_state()[0], np.random.get_state()[1].tolist(),
                             *np.random.get_state()[2:]]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast  # noqa: PLC0415

    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Counters stored in every checkpoint so a resume continues exactly."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # batches already consumed in `epoch`
    total_steps: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def continue_at_same_example(state: TrainState, batch_size: int) -> None:
    """Re-express a resumed `step_in_epoch` in batches of the new `batch_size`.

    An out-of-memory downshift resumes with a smaller batch (and more accumulation); the
    checkpoint counted batches of the old size, so without this the run would replay part
    of the epoch. Exact when the epoch order does not depend on the batch size (text runs);
    image buckets regroup, so there it lands on the same share of the epoch.
    """
    old = int(state.config.get("batch_size") or batch_size)
    if old != batch_size:
        state.step_in_epoch = state.step_in_epoch * old // batch_size
    state.config = {**state.config, "batch_size": batch_size}


def save_checkpoint(output_dir: str | Path, state: TrainState, *, optimizer: torch.optim.Optimizer,
                    scheduler: Any, write_weights: Callable[[Path], None],
                    extra: dict[str, Any] | None = None, keep: int = 0) -> Path:
    """Write a checkpoint folder atomically: LoRA weights, optimizer, scheduler, RNG, counters.

    `write_weights(folder)` saves the LoRA weights (in the task's own format) into `folder`.
    Returns the final folder. Older checkpoints beyond `keep` (0: keep all) are removed.
    """
    target = checkpoint_path(output_dir, state.global_step)
    with atomic_dir(target) as tmp:
        write_weights(tmp)
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(), "extra": extra or {}}, tmp / "training_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1, default=str), encoding="utf-8")
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint_state(folder: str | Path, *, optimizer: torch.optim.Optimizer | None,
                          scheduler: Any) -> tuple[TrainState, dict[str, Any]]:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns the counters and `extra`.

    Loaded with `weights_only=True`: a checkpoint never runs code.
    """
    folder = Path(folder)
    if not is_complete_dir(folder):
        raise ValueError(f"{folder} is not a complete checkpoint (it was being written when the run "
                         "ended). Use an older one, or resume_from: latest to pick the newest good one.")
    data = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(data["optimizer"])
    if scheduler is not None and data.get("scheduler") is not None:
        scheduler.load_state_dict(data["scheduler"])
    set_rng_state(data["rng"])
    raw = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    state = TrainState(**{k: v for k, v in raw.items() if k in TrainState.__dataclass_fields__})
    return state, data.get("extra") or {}


def resolve_resume(cfg: TrainConfig) -> tuple[Path | None, Path | None]:
    """What `resume_from` points at: (checkpoint folder, LoRA weights file). Both may be None.

    'latest' picks the newest complete checkpoint in output_dir (none yet: start fresh).
    A file (e.g. a .safetensors LoRA) is returned as weights to continue from.
    """
    value = cfg.resume_from
    if not value:
        return None, Path(cfg.init_lora) if cfg.init_lora else None
    if value == "latest":
        return latest_checkpoint(cfg.output_dir), None
    path = Path(value)
    if path.is_dir():
        if is_complete_dir(path):
            return path, None
        if (path / CHECKPOINT_DIR).is_dir():  # an output folder: its newest checkpoint
            return latest_checkpoint(path), None
        raise ValueError(f"resume_from: {path} is not a complete checkpoint folder.")
    return None, path


# --- logging -----------------------------------------------------------------------------

class RunLog:
    """loss.csv (step, loss, lr) and TensorBoard scalars under output_dir/logs.

    loss.csv is append-only; on resume the rows after the resumed step are dropped so
    the curve has no duplicates.
    """

    def __init__(self, output_dir: str | Path, resume_step: int = 0):
        self.csv_path = Path(output_dir) / "loss.csv"
        kept = ["step,loss,lr\n"]
        if resume_step > 0 and self.csv_path.is_file():
            for line in self.csv_path.read_text(encoding="utf-8").splitlines()[1:]:
                head = line.split(",", 1)[0]
                if head.isdigit() and int(head) <= resume_step:
                    kept.append(line + "\n")
        atomic_write_text(self.csv_path, "".join(kept))
        self._csv = open(self.csv_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "logs"), purge_step=resume_step or None)
        except Exception:  # noqa: BLE001 - TensorBoard is optional for the run itself
            self._tb = None

    def log(self, step: int, loss: float, lr: float, extra: dict[str, float] | None = None) -> None:
        self._csv.write(f"{step},{loss:.6g},{lr:.6g}\n")
        self._csv.flush()
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)
            for key, value in (extra or {}).items():
                self._tb.add_scalar(key, value, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._csv.close()
        if self._tb is not None:
            self._tb.close()


class ProgressMeter:
    """Smoothed loss, seconds per step and ETA, turned into ProgressEvents."""

    def __init__(self, total: int, start_step: int = 0, beta: float = 0.9):
        self.total = total
        self.beta = beta
        self.smoothed: float | None = None
        self._count = 0
        self._times: list[float] = []
        self._last = time.perf_counter()
        self.start_step = start_step

    def update(self, step: int, epoch: int, loss: float, lr: float) -> ProgressEvent:
        now = time.perf_counter()
        self._times.append(now - self._last)
        self._times = self._times[-20:]
        self._last = now
        self._count += 1
        # Bias-corrected EMA so the first values are not pulled towards 0.
        self.smoothed = loss if self.smoothed is None else self.beta * self.smoothed + (1 - self.beta) * loss
        # The first step carries warm-up costs; leave it out of the rate once there are others.
        times = self._times[1:] if len(self._times) > 2 else self._times
        per_step = sum(times) / len(times)
        return ProgressEvent(step=step, total=self.total, epoch=epoch, loss=loss,
                             smoothed_loss=self.smoothed, lr=lr, seconds_per_step=per_step,
                             eta_seconds=per_step * max(0, self.total - step), vram_gb=vram_gb())


def record_step(cfg: TrainConfig, ctx: RunContext, log: RunLog, meter: ProgressMeter, state: TrainState,
                loss: float, lr: float) -> None:
    """After an optimizer step: loss.csv / TensorBoard every `logging_steps`, and a ProgressEvent."""
    if state.global_step % cfg.logging_steps == 0:
        log.log(state.global_step, loss, lr)
    ctx.emit(meter.update(state.global_step, state.epoch + 1, loss, lr))


def checkpoint_due(cfg: TrainConfig, step: int, *, done: bool, stopped: bool) -> bool:
    """A periodic checkpoint; the last step and a stop save theirs after the loop."""
    return bool(cfg.save_steps) and step % cfg.save_steps == 0 and not done and not stopped


def sample_due(cfg: TrainConfig, step: int, *, done: bool) -> bool:
    """Previews every `sample_steps`; the end makes its own."""
    return bool(cfg.sample_prompts) and cfg.sample_steps > 0 and step % cfg.sample_steps == 0 and not done


def vram_gb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def enable_activation_checkpointing(model: Any, **kwargs: Any) -> None:
    """Recompute a transformers model's activations in the backward pass.

    transformers 5 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
    (the old name warns and goes in v6); take whichever this version has.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def check_finite(loss: float, step: int, cfg: TrainConfig) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(step, cfg)


# --- optimizer and schedule ----------------------------------------------------------------

def build_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig, ctx: RunContext | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named in the config; adamw8bit falls back to AdamW with a warning."""
    name = cfg.optimizer
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415

            if torch.cuda.is_available():
                return bnb.optim.AdamW8bit(param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        except ImportError:
            pass
        if ctx is not None:
            ctx.warn("adamw8bit needs bitsandbytes and a CUDA GPU; using AdamW instead.",
                     "pip install bitsandbytes on a CUDA machine to save optimizer memory.")
        name = "adamw"
    if name == "adafactor":
        from transformers.optimization import Adafactor  # noqa: PLC0415

        return Adafactor(param_groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    fused = torch.cuda.is_available() and all(
        p.is_cuda for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler  # noqa: PLC0415

    return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=max(1, total_steps))


def total_steps_for(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps in the run, optimizer steps per epoch)."""
    per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    if cfg.max_train_steps > 0:
        return cfg.max_train_steps, per_epoch
    return per_epoch * cfg.epochs, per_epoch


def lora_param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], lr: float,
                      loraplus_ratio: float) -> list[dict[str, Any]]:
    """Parameter groups; with LoRA+ the B ("lora_B" / "lora_up") matrices get lr * ratio."""
    named = [(n, p) for n, p in named if p.requires_grad]
    if loraplus_ratio <= 0:
        return [{"params": [p for _, p in named], "lr": lr}]
    b_params = [p for n, p in named if "lora_B" in n or "lora_up" in n or "lora_embedding_B" in n]
    ids = {id(p) for p in b_params}
    rest = [p for _, p in named if id(p) not in ids]
    groups = [{"params": rest, "lr": lr}]
    if b_params:
        groups.append({"params": b_params, "lr": lr * loraplus_ratio})
    return groups
