"""The run folder and what makes a run resumable: checkpoints (written atomically, with
their optimizer, scheduler, RNG and counters), finding the newest one, and `resume_from`.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from core.atomic import atomic_dir, is_complete_dir
from core.config import TrainConfig, save_config

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^step-(\d+)$")


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
    import ast

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
    # The EMA's tensors (core.train.ema) while a checkpoint is written / after one is read; not in the JSON.
    ema: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def counters(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "ema"}


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
        if state.ema is not None:
            from safetensors.torch import save_file

            from core.train.ema import EMA_FILE

            save_file(state.ema, str(tmp / EMA_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state.counters(), indent=1, default=str), encoding="utf-8")
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
    state = TrainState(**{k: v for k, v in raw.items() if k in TrainState.__dataclass_fields__ and k != "ema"})
    from core.train.ema import EMA_FILE

    if (folder / EMA_FILE).is_file():
        from safetensors.torch import load_file

        state.ema = load_file(str(folder / EMA_FILE))
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
