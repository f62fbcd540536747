"""The Qwen-Image training objective: flow matching on the packed latents (velocity noise - x0), sigmas shifted
by the pipeline's dynamic shift at each batch's size (or the configured sampling); Edit appends the control
image's packed latents (Edit Plus: each reference's, one img_shapes entry each, as QwenImageEditPlusPipeline)
and keeps the prediction of the target's tokens.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.families.qwen_image.load import SHIFT_POINTS
from core.families.qwen_image.text import QwenPrompts
from core.family_api.contract import Batch


def timestep_sampling(cfg: TrainConfig) -> str:
    """auto: the pipeline's dynamic shift at each batch's size; otherwise the configured method."""
    return "dynamic" if cfg.timestep_sampling == "auto" else cfg.timestep_sampling


def dynamic_shift(image_tokens: int, points: dict[str, Any] | None = None) -> float:
    """exp(mu) of the pipeline's scheduler at `image_tokens` packed tokens (about 2.3 at 1328 px)."""
    p = {**SHIFT_POINTS, **{k: v for k, v in (points or {}).items() if k in SHIFT_POINTS}}
    slope = (p["max_shift"] - p["base_shift"]) / (p["max_image_seq_len"] - p["base_image_seq_len"])
    mu = image_tokens * slope + p["base_shift"] - slope * p["base_image_seq_len"]
    return math.exp(mu)


def sample_sigmas(batch: int, method: str, *, image_tokens: int, shift: float, generator: torch.Generator | None,
                  device: torch.device, points: dict[str, Any] | None = None) -> torch.Tensor:
    """Noise levels: "dynamic" (the default: sigmoid(normal) shifted by the pipeline's exp(mu)), or the shared ones."""
    from core.families.dit.flow import sample_sigmas as flow_sigmas

    if method == "dynamic":
        return flow_sigmas(batch, "shift", shift=dynamic_shift(image_tokens, points), generator=generator,
                           device=device)
    return flow_sigmas(batch, method, shift=shift, generator=generator, device=device)


@dataclass
class QwenBatch:
    latents: torch.Tensor                   # [B, C, h, w] normalized target latents
    prompts: QwenPrompts
    control: torch.Tensor | None = None     # [B, C, hc, wc] normalized control latents (Edit)
    references: Sequence[torch.Tensor] = ()  # every reference's latents in order (Edit Plus; control first)


def qwen_loss(transformer: Any, batch: QwenBatch, generator: torch.Generator | None = None, *,
              timestep_sampling: str = "dynamic", shift: float = 2.2, dtype: torch.dtype = torch.float32,
              sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              points: dict[str, Any] | None = None) -> torch.Tensor:
    """Flow-matching MSE on the packed latents (velocity noise - x0), transformer run in `dtype`."""
    from core.families.dit.flow import flow_target, noise_and_sigmas, noisy_latents, pack_latents

    x0 = batch.latents.float()
    b, _, h, w = x0.shape
    noise, sigmas = noise_and_sigmas(x0, generator, noise, sigmas, lambda: sample_sigmas(
        b, timestep_sampling, image_tokens=(h // 2) * (w // 2), shift=shift, generator=generator, device=x0.device,
        points=points))
    packed = pack_latents(noisy_latents(x0, noise, sigmas))
    tokens = packed.shape[1]
    shapes: list[tuple[int, int, int]] = [(1, h // 2, w // 2)]
    references = list(batch.references) or ([batch.control] if batch.control is not None else [])
    for reference in references:
        reference = reference.float().to(x0.device)
        shapes.append((1, reference.shape[2] // 2, reference.shape[3] // 2))
        packed = torch.cat([packed, pack_latents(reference)], dim=1)
    prompts = batch.prompts.to(x0.device, dtype)
    with torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = transformer(hidden_states=packed.to(dtype), encoder_hidden_states=prompts.embeds,
                           encoder_hidden_states_mask=prompts.mask, timestep=sigmas.to(x0.device, dtype),
                           img_shapes=[shapes] * b, return_dict=False)[0]
    return F.mse_loss(pred[:, :tokens].float(), pack_latents(flow_target(x0, noise)), reduction="mean")


def make_loss(model: Any, cfg: TrainConfig, dtype: torch.dtype) -> Callable[[nn.Module, Batch], torch.Tensor]:
    sampling = timestep_sampling(cfg)
    points = dict(model.scheduler_config)

    def loss(transformer: nn.Module, batch: Batch) -> torch.Tensor:
        return qwen_loss(transformer, QwenBatch(batch.latents, batch.cond, batch.control, batch.references),
                         timestep_sampling=sampling,
                         shift=cfg.discrete_flow_shift, dtype=dtype, points=points)

    return loss
