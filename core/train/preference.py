"""Preference tuning of a text LoRA (text_method dpo or orpo) through the one training loop.

A `PreferenceRun` is a `TextRun` whose batches are comparisons (a prompt with a chosen
and a rejected answer) and whose step loss is DPO's or ORPO's (core.train.preference_step).
Everything else is the text run's: the model and adapter, checkpoints and resume, stop,
previews and the final files. Validation is the same preference loss on the held-out
comparisons; the share of them where the chosen answer wins and the mean margin are
logged beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Sequence

import torch

from core.config import TrainConfig
from core.data import preference as pref_data
from core.data import text as text_data
from core.events import RunContext
from core.train import distributed
from core.train.preference_step import (PairBatch, epoch_item_batches, make_pair_batch, mean_or_zero, pair_loss,
                                       read_split)
from core.train.text import TextRun, warn_cut


@dataclass
class Comparisons:
    """The comparisons as read (before tokenizing): training and validation."""

    train: list[pref_data.PreferenceExample]
    validation: list[pref_data.PreferenceExample]


@dataclass
class PreferenceData:
    train: list[pref_data.TokenizedPair]
    validation: list[pref_data.TokenizedPair] = field(default_factory=list)

    def describe(self) -> str:
        tokens = sum(len(p) for p in self.train)
        return (f"{len(self.train)} comparisons ({tokens} tokens, chosen and rejected)"
                + (f", {len(self.validation)} for validation" if self.validation else ""))


def read_data(cfg: TrainConfig) -> Comparisons:
    """Read and split the comparisons; TextDataError names the file when the columns are missing."""
    return Comparisons(*read_split(cfg, pref_data.load_preference_examples))


def prepare_data(cfg: TrainConfig, comparisons: Comparisons, tokenizer: Any, ctx: RunContext) -> PreferenceData:
    """Tokenize both answers of each comparison; warn about cut ones as SFT does."""
    train = pref_data.tokenize_pairs(tokenizer, comparisons.train, cfg.max_seq_length)
    held = pref_data.tokenize_pairs(tokenizer, comparisons.validation, cfg.max_seq_length)
    warn_cut(cfg, ctx, train.truncated + held.truncated, train.dropped + held.dropped)
    if not train.pairs:
        raise text_data.TextDataError(f"{cfg.train_data_dir}: no usable comparisons remain.")
    return PreferenceData(train.pairs, held.pairs)


@dataclass
class PreferenceRun(TextRun):
    """A text run that learns to prefer the chosen answers (DPO or ORPO)."""

    last_scalars: dict[str, float] = field(default_factory=dict)
    validation_stats: dict[str, float] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.cfg.text_method

    def batches(self, epoch: int) -> list[PairBatch]:  # type: ignore[override]
        return epoch_item_batches(self.data.train, self.cfg, epoch, self.shard, self.tokenizer.pad_token_id or 0,
                                  make_pair_batch)

    epoch_batches = batches  # type: ignore[assignment]

    def validation_batches(self) -> list[PairBatch]:  # type: ignore[override]
        pad_id = self.tokenizer.pad_token_id or 0
        items, size = self.data.validation, self.cfg.batch_size
        return [make_pair_batch(items[i:i + size], pad_id) for i in range(0, len(items), size)]

    def plan(self, total: int) -> str:
        weight = "beta" if self.method == "dpo" else "lambda"
        return (f"{super().plan(total)}; {self.method.upper()} on {len(self.data.train)} comparisons, "
                f"{weight} {self.cfg.preference_beta:g}")

    def train_step(self, group: Sequence[PairBatch]) -> float:  # type: ignore[override]
        """Each micro-batch's summed comparison losses, over the comparisons of the whole group (all processes)."""
        divisor = self.step_divisor(sum(b.pairs for b in group))
        loss_total = 0.0
        tokens = 0
        margins = []
        for index, pair_batch in enumerate(group):
            with distributed.sync_on_last(self.accelerator, [self.trained], index, len(group)):
                result = pair_loss(self.method, self.model, pair_batch, self.device, self.precision,
                                   self.cfg.preference_beta, policy_model=self.trained)
                (result.losses.sum() / divisor).backward()
            loss_total += float(result.losses.detach().sum())
            margins.append(result.margins)
            tokens += pair_batch.batch.tokens
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        margin = torch.cat(margins)
        if self.world == 1:
            loss, _ = self.step_loss(loss_total, tokens, divisor)
            self.last_scalars = {"preference/margin": mean_or_zero(margin), "preference/accuracy": mean_or_zero(margin > 0)}
            return loss
        # The margins of every process's comparisons: their sum, wins and count.
        loss, (margin_sum, wins, count) = self.step_loss(loss_total, tokens, divisor, float(margin.sum()),
                                                         float((margin > 0).sum()), float(margin.numel()))
        self.last_scalars = {"preference/margin": margin_sum / max(1.0, count),
                             "preference/accuracy": wins / max(1.0, count)}
        return loss

    def step_scalars(self) -> dict[str, float]:
        """TensorBoard scalars of the last step (core.train.loop reads them)."""
        return self.last_scalars

    def validate(self, step: int) -> float | None:
        """The preference loss on the held-out comparisons, on the main process alone (as TextRun.validate)."""
        if not self.data.validation or not self.main:
            return None
        causal_lm = self.causal_lm
        was_training = causal_lm.training
        causal_lm.eval()
        losses, margins = [], []
        try:
            with torch.no_grad():
                for pair_batch in self.validation_batches():
                    result = pair_loss(self.method, self.model, pair_batch, self.device, self.precision,
                                       self.cfg.preference_beta)
                    losses.append(result.losses)
                    margins.append(result.margins)
        finally:
            if was_training:
                causal_lm.train()
        margin = torch.cat(margins)
        self.validation_stats = {"validation_accuracy": round(mean_or_zero(margin > 0), 4),
                                 "validation_margin": round(mean_or_zero(margin), 4)}
        self.ctx.log(f"Validation at step {step}: chosen preferred in "
                     f"{self.validation_stats['validation_accuracy']:.0%} of {margin.numel()} comparisons, "
                     f"mean margin {self.validation_stats['validation_margin']:.3f}")
        return mean_or_zero(torch.cat(losses))

    def summary_extra(self) -> dict[str, Any]:
        return {"text_method": self.method, "preference_beta": self.cfg.preference_beta,
                "comparisons": len(self.data.train), **self.validation_stats}


RUN_CLASS = PreferenceRun
