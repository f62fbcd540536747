"""The text LoRA's forward pass and loss, computed only where there is something to learn.

The vocabulary projection (lm_head) is a large share of a small LM's compute (SmolLM2:
576 x 49152 per token). Only the positions that carry a label (the answers) need
logits, so the decoder runs on every token and the head only on the labelled ones.
Models whose head does more than a matmul (soft-capping, logit scaling) take the
ordinary full forward instead.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from core.data.text import IGNORE_INDEX
from core.train.text_batches import TextBatch

_SPECIAL_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_head(config: Any) -> bool:
    """True when logits are just lm_head(hidden): the head can run on selected positions."""
    return not any(getattr(config, key, None) not in (None, 1, 1.0) for key in _SPECIAL_HEAD_KEYS)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def batch_loss_sum(causal_lm: Any, batch: TextBatch, device: torch.device, precision: str = "no"
                   ) -> torch.Tensor:
    """Sum of the token losses of `batch` (divide by the labelled-token count for the mean).

    `causal_lm` is a causal LM, or the trained `AnswerModel` (DDP-wrapped in several processes).
    """
    logits, targets, _ = labelled_logits(causal_lm, batch, device, precision)
    return F.cross_entropy(logits, targets, reduction="sum")


class AnswerModel(torch.nn.Module):
    """The PEFT model as the module DDP wraps: its forward gives the labelled positions' logits.

    DDP syncs gradients only for a forward that goes through its wrapper, and the PEFT model's
    own forward would compute the head on every position; this forward is `answer_logits`.
    """

    def __init__(self, peft_model: Any, device: torch.device, precision: str):
        super().__init__()
        self.peft_model = peft_model
        self.device, self.precision = device, precision

    def forward(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return answer_logits(self.peft_model.get_base_model(), batch, self.device, self.precision)


def labelled_logits(model: Any, batch: TextBatch, device: torch.device, precision: str = "no"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`answer_logits` of a causal LM, or through an `AnswerModel` (and its DDP wrapper) when given one."""
    from accelerate.utils import extract_model_from_parallel

    if isinstance(extract_model_from_parallel(model), AnswerModel):
        return model(batch)
    return answer_logits(model, batch, device, precision)


def answer_logits(causal_lm: Any, batch: TextBatch, device: torch.device, precision: str = "no"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 logits, target ids) of the labelled positions only, and the mask that selected them."""
    labels = batch.labels.to(device)
    inputs = {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
              "attention_mask": None if batch.attention_mask is None else batch.attention_mask.to(device),
              "use_cache": False}
    selected = labels != IGNORE_INDEX
    with autocast_for(device, precision):
        if plain_head(causal_lm.config):
            body = getattr(causal_lm, causal_lm.base_model_prefix)
            hidden = body(**inputs).last_hidden_state
            logits = causal_lm.get_output_embeddings()(hidden[selected])
        else:
            logits = causal_lm(**inputs).logits[selected]
    return logits.float(), labels[selected], selected


@torch.no_grad()
def validation_loss(causal_lm: Any, batches: list[TextBatch], device: torch.device, precision: str = "no"
                    ) -> float:
    """Mean token loss over `batches` (eval mode, no gradients)."""
    was_training = causal_lm.training
    causal_lm.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            total += float(batch_loss_sum(causal_lm, batch, device, precision))
            count += batch.trained_tokens
    finally:
        if was_training:
            causal_lm.train()
    return total / max(1, count)
