"""The optimizer, the learning-rate schedule, LoRA(+) parameter groups and the run's step count."""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Iterable

import torch

from core.config import TrainConfig
from core.events import RunContext


def build_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig, ctx: RunContext | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named in the config; adamw8bit falls back to AdamW with a warning."""
    name = cfg.optimizer
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            if torch.cuda.is_available():
                return bnb.optim.AdamW8bit(param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        except ImportError:
            pass
        if ctx is not None:
            ctx.warn("adamw8bit needs bitsandbytes and a CUDA GPU; using AdamW instead.",
                     "pip install bitsandbytes on a CUDA machine to save optimizer memory.")
        name = "adamw"
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    fused = torch.cuda.is_available() and all(
        p.is_cuda for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

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
