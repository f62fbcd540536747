"""What the loops check and switch on while a model trains: the NaN/inf loss guard and
activation checkpointing.

The loops call `runtime.check_finite` through this module on purpose: the recovery tests
replace it to inject an out-of-memory error or a NaN exactly where a real loop meets one.
"""
from __future__ import annotations

import math
from typing import Any

from core.config import TrainConfig


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


def check_finite(loss: float, step: int, cfg: TrainConfig) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(step, cfg)


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
