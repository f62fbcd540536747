"""KTO (text_method kto): a text LoRA learns from answers marked desirable or not, no pairs needed.

Kahneman-Tversky Optimization (Ethayarajh et al. 2024), as TRL's KTOTrainer computes it, through
the one training loop: with r = logp_policy(answer) - logp_reference(answer) (summed answer
tokens; the reference is the model with the adapter switched off, as for DPO) and z a detached
estimate of KL(policy || reference), the loss is 1 - sigmoid(beta * (r - z)) for a desirable
answer and 1 - sigmoid(beta * (z - r)) for an undesirable one. TRL estimates z on mismatched
prompt/answer pairs, a third forward pass; here it is the micro-batch's own mean r (clamped at 0,
no gradient), which needs no extra pass. TRL's trainer is not used: it owns its training loop,
and this app has one loop for every method (stop, resume, checkpoints, several GPUs).
`preference_beta` is beta.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

import torch

from core.config import TrainConfig
from core.data import rl_data
from core.data import text as text_data
from core.events import RunContext
from core.train import distributed
from core.train.preference_step import (epoch_item_batches, mean_or_zero, read_split, segment_logps,
                                       sequence_segments)
from core.train.text import TextRun, warn_cut
from core.train.text_batches import MAX_PACKED_TOKENS, TextBatch, make_batch


@dataclass
class Rows:
    train: list[rl_data.LabelledCompletion]
    validation: list[rl_data.LabelledCompletion]


@dataclass
class KtoData:
    train: list[rl_data.TokenizedLabelled]
    validation: list[rl_data.TokenizedLabelled] = field(default_factory=list)

    def describe(self) -> str:
        good = sum(item.desirable for item in self.train)
        return (f"{len(self.train)} labelled answers ({good} desirable, {len(self.train) - good} undesirable)"
                + (f", {len(self.validation)} for validation" if self.validation else ""))


def read_data(cfg: TrainConfig) -> Rows:
    return Rows(*read_split(cfg, rl_data.load_labelled))


def prepare_data(cfg: TrainConfig, rows: Rows, tokenizer: Any, ctx: RunContext) -> KtoData:
    train = rl_data.tokenize_labelled(tokenizer, rows.train, cfg.max_seq_length)
    held = rl_data.tokenize_labelled(tokenizer, rows.validation, cfg.max_seq_length)
    warn_cut(cfg, ctx, train.truncated + held.truncated, train.dropped + held.dropped)
    if not train.items:
        raise text_data.TextDataError(f"{cfg.train_data_dir}: no usable labelled answers remain.")
    return KtoData(train.items, held.items)


@dataclass
class LabelledBatch:
    batch: TextBatch
    segments: torch.Tensor
    desirable: torch.Tensor  # (n,) bool

    @property
    def count(self) -> int:
        return int(self.desirable.numel())


def make_labelled_batch(items: list[rl_data.TokenizedLabelled], pad_id: int) -> LabelledBatch:
    batch = make_batch([item.example for item in items], pad_id, MAX_PACKED_TOKENS)
    segments = sequence_segments(batch, [len(item) for item in items])
    return LabelledBatch(batch, segments, torch.tensor([item.desirable for item in items]))


@dataclass
class KtoLoss:
    losses: torch.Tensor  # (n,), with gradients
    rewards: torch.Tensor  # (n,) detached: beta * (logp_policy - logp_reference)
    kl: float


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, beta: float) -> KtoLoss:
    ratio = policy - reference
    kl = ratio.detach().mean().clamp(min=0)
    desirable = desirable.to(ratio.device)
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio)))
    return KtoLoss(losses, beta * ratio.detach(), float(kl))


def labelled_loss(peft_model: Any, batch: LabelledBatch, device: torch.device, precision: str, beta: float,
                  policy_model: Any = None) -> KtoLoss:
    with torch.no_grad(), peft_model.disable_adapter():
        reference = segment_logps(peft_model.get_base_model(), batch.batch, batch.segments, batch.count, device,
                                  precision).sums
    model = policy_model if policy_model is not None else peft_model.get_base_model()
    policy = segment_logps(model, batch.batch, batch.segments, batch.count, device, precision).sums
    return kto_loss(policy, reference, batch.desirable, beta)


@dataclass
class KtoRun(TextRun):
    """A text run that raises desirable answers and lowers undesirable ones, each against the base."""

    last_scalars: dict[str, float] = field(default_factory=dict)
    validation_stats: dict[str, float] = field(default_factory=dict)

    def batches(self, epoch: int) -> list[LabelledBatch]:  # type: ignore[override]
        return epoch_item_batches(self.data.train, self.cfg, epoch, self.shard, self.tokenizer.pad_token_id or 0,
                                  make_labelled_batch)

    epoch_batches = batches  # type: ignore[assignment]

    def plan(self, total: int) -> str:
        return f"{super().plan(total)}; KTO on {self.data.describe()}, beta {self.cfg.preference_beta:g}"

    def train_step(self, group: Sequence[LabelledBatch]) -> float:  # type: ignore[override]
        divisor = self.step_divisor(sum(b.count for b in group))
        loss_total, tokens = 0.0, 0
        rewards, labels = [], []
        for index, batch in enumerate(group):
            with distributed.sync_on_last(self.accelerator, [self.trained], index, len(group)):
                result = labelled_loss(self.model, batch, self.device, self.precision, self.cfg.preference_beta,
                                       policy_model=self.trained)
                (result.losses.sum() / divisor).backward()
            loss_total += float(result.losses.detach().sum())
            tokens += batch.batch.tokens
            rewards.append(result.rewards)
            labels.append(batch.desirable)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        reward, desirable = torch.cat(rewards).cpu(), torch.cat(labels)
        loss, _ = self.step_loss(loss_total, tokens, divisor)
        self.last_scalars = {"kto/reward_desirable": mean_or_zero(reward[desirable]),
                             "kto/reward_undesirable": mean_or_zero(reward[~desirable])}
        return loss

    def step_scalars(self) -> dict[str, float]:
        return self.last_scalars

    def validate(self, step: int) -> float | None:
        """KTO's loss on the held-out answers, and the mean reward of the desirable and undesirable ones."""
        if not self.data.validation or not self.main:
            return None
        causal_lm = self.causal_lm
        was_training = causal_lm.training
        causal_lm.eval()
        losses, rewards, labels = [], [], []
        pad_id = self.tokenizer.pad_token_id or 0
        items, size = self.data.validation, self.cfg.batch_size
        try:
            with torch.no_grad():
                for start in range(0, len(items), size):
                    batch = make_labelled_batch(items[start:start + size], pad_id)
                    result = labelled_loss(self.model, batch, self.device, self.precision, self.cfg.preference_beta)
                    losses.append(result.losses)
                    rewards.append(result.rewards.cpu())
                    labels.append(batch.desirable)
        finally:
            if was_training:
                causal_lm.train()
        reward, desirable = torch.cat(rewards), torch.cat(labels)
        self.validation_stats = {"validation_reward_desirable": round(mean_or_zero(reward[desirable]), 4),
                                 "validation_reward_undesirable": round(mean_or_zero(reward[~desirable]), 4)}
        self.ctx.log(f"Validation at step {step}: reward of desirable answers "
                     f"{self.validation_stats['validation_reward_desirable']:.3f}, of undesirable ones "
                     f"{self.validation_stats['validation_reward_undesirable']:.3f}")
        return mean_or_zero(torch.cat(losses))

    def summary_extra(self) -> dict[str, Any]:
        return {"text_method": "kto", "preference_beta": self.cfg.preference_beta,
                "labelled_answers": len(self.data.train), **self.validation_stats}


RUN_CLASS = KtoRun
