"""Training entry: one function for every task type, called by Job and train.py."""
from __future__ import annotations

from typing import Any

from core.config import TrainConfig
from core.events import RunContext


def train_task(cfg: TrainConfig, ctx: RunContext) -> dict[str, Any]:
    """One attempt of the image or text loop, without out-of-memory recovery."""
    if cfg.task_type == "text-generation":
        from core.train.text import train_text  # noqa: PLC0415

        return train_text(cfg, ctx)
    from core.train.image import train_image  # noqa: PLC0415

    return train_image(cfg, ctx)


def run_training(cfg: TrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Train `cfg` to the end (or until ctx asks to stop); returns the output paths.

    Goes through core.train.recovery: the memory estimate is logged first, an
    out-of-memory error ends with the settings to change or, with auto_downshift,
    resumes from the last checkpoint with the next smaller preset.
    """
    from core.train.recovery import train_with_recovery  # noqa: PLC0415

    return train_with_recovery(train_task, cfg, ctx)
