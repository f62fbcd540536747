"""Training entry: one function for every task type, called by Job and train.py."""
from __future__ import annotations

from typing import Any

from core.config import TrainConfig
from core.events import RunContext


def run_training(cfg: TrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Train `cfg` to the end (or until ctx asks to stop); returns the output paths."""
    if cfg.task_type == "text-generation":
        from core.train.text import train_text  # noqa: PLC0415

        return train_text(cfg, ctx)
    from core.train.image import train_image  # noqa: PLC0415

    return train_image(cfg, ctx)
