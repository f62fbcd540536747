"""Training entry: one function for every task type, called by Job and train.py."""
from __future__ import annotations

from typing import Any

from core.config import TrainConfig
from core.events import RunContext


def train_task(cfg: TrainConfig, ctx: RunContext) -> dict[str, Any]:
    """One attempt of the image or text loop, without out-of-memory recovery."""
    if cfg.task_type == "text-generation":
        from core.train.text import train_text

        return train_text(cfg, ctx)
    from core.train.image import train_image

    return train_image(cfg, ctx)


def run_training(cfg: TrainConfig, ctx: RunContext) -> dict[str, Any]:
    """Train `cfg` to the end (or until ctx asks to stop); returns the output paths.

    The installed libraries are checked against the tested set first (core.versions).
    Then it goes through core.train.recovery: the memory estimate is logged first, an
    out-of-memory error ends with the settings to change or, with auto_downshift,
    resumes from the last checkpoint with the next smaller preset.
    """
    from core.cpu_memory import keeping_freed_memory
    from core.devices import collecting_new_objects_only, pick_device
    from core.train.recovery import train_with_recovery

    check_libraries(ctx)
    # On the CPU each step's activations are reused by the next instead of page-faulted in again.
    on_cpu = pick_device("auto", mps=cfg.task_type != "text-generation").type == "cpu"
    with collecting_new_objects_only(), keeping_freed_memory(on_cpu):
        return train_with_recovery(train_task, cfg, ctx)


def check_libraries(ctx: RunContext) -> None:
    """Before any work: refuse libraries that cannot work together, warn about untested ones."""
    from core.events import WarningEvent
    from core.versions import check_before_training, restore_advice, untested_message

    untested = check_before_training()
    if untested:
        ctx.emit(WarningEvent(message=untested_message(untested), advice=restore_advice()))
