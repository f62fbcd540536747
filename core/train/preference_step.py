"""DPO and ORPO: answer log-probabilities of a batch of comparisons, and the two losses.

A micro-batch of n comparisons is one forward pass over 2n sequences (the n chosen, then
the n rejected), packed or padded like SFT batches; a segment index per position says
which sequence each labelled token belongs to, so per-sequence sums come from one
`index_add_`. DPO's reference is the same model with the adapter switched off
(`PeftModel.disable_adapter()`), under no_grad: no second copy of the model in memory,
and frozen base weights make it the same at every step and across resume.

- DPO (Rafailov et al. 2023): -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with
  summed answer log-probs.
- ORPO (Hong et al. 2024): NLL of the chosen answer + lambda * -logsigmoid(log odds ratio),
  with per-token mean log-probs p and odds p / (1 - p); no reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from core.data.preference import TokenizedPair
from core.train.text_batches import MAX_PACKED_TOKENS, TextBatch, epoch_batches, make_batch
from core.train.text_step import labelled_logits


@dataclass
class PairBatch:
    """n comparisons as one batch: rows 0..n-1 of `segments` are chosen, n..2n-1 rejected."""

    batch: TextBatch
    segments: torch.Tensor  # like batch.labels: the sequence (0..2n-1) each position belongs to
    pairs: int


@dataclass
class AnswerLogps:
    """Summed log-probs and labelled-token counts of each chosen and rejected answer."""

    chosen: torch.Tensor  # (n,)
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens


@dataclass
class PreferenceLoss:
    """Per-comparison losses and margins, positive when chosen wins (DPO: beta times the reward margin;
    ORPO: the log odds ratio)."""

    losses: torch.Tensor  # (n,), with gradients
    margins: torch.Tensor  # (n,), detached


def make_pair_batch(pairs: list[TokenizedPair], pad_id: int, max_packed: int = MAX_PACKED_TOKENS) -> PairBatch:
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = make_batch(sequences, pad_id, max_packed)
    return PairBatch(batch, sequence_segments(batch, [len(seq) for seq in sequences]), len(pairs))


@dataclass
class SegmentLogps:
    """Per-token log-probs of a batch's labelled tokens, whose sequence each is, and per-sequence sums."""

    token_logps: torch.Tensor  # (labelled tokens,)
    owner: torch.Tensor  # (labelled tokens,): the sequence index of each
    sums: torch.Tensor  # (sequences,)
    tokens: torch.Tensor  # (sequences,): labelled tokens of each


def segment_logps(causal_lm: Any, batch: TextBatch, segments: torch.Tensor, count: int, device: torch.device,
                  precision: str = "no") -> SegmentLogps:
    """Token log-probs of `batch`'s labelled positions under `causal_lm` (or an `AnswerModel`), by sequence.

    `segments` is like batch.labels: the sequence (0..count-1) each position belongs to. Shared by DPO,
    ORPO, KTO (summed answer log-probs) and GRPO (per-token log-probs).
    """
    logits, targets, selected = labelled_logits(causal_lm, batch, device, precision)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    owner = segments.to(device)[selected]
    sums = torch.zeros(count, device=device, dtype=token_logps.dtype).index_add(0, owner, token_logps)
    tokens = torch.zeros(count, device=device, dtype=token_logps.dtype).index_add(0, owner, torch.ones_like(token_logps))
    return SegmentLogps(token_logps, owner, sums, tokens)


def sequence_segments(batch: TextBatch, lengths: list[int]) -> torch.Tensor:
    """The segment index of each position of a batch made by `make_batch` from sequences of `lengths`."""
    if batch.attention_mask is None:  # packed into one row, back to back
        return torch.tensor([[i for i, n in enumerate(lengths) for _ in range(n)]])
    return torch.arange(len(lengths)).unsqueeze(1).expand_as(batch.labels).contiguous()  # one sequence per row


def answer_logps(causal_lm: Any, pair_batch: PairBatch, device: torch.device, precision: str = "no"
                 ) -> AnswerLogps:
    """Each answer's summed token log-probability under `causal_lm` (or an `AnswerModel`) as it is now."""
    n = pair_batch.pairs
    logps = segment_logps(causal_lm, pair_batch.batch, pair_batch.segments, 2 * n, device, precision)
    sums, tokens = logps.sums, logps.tokens
    return AnswerLogps(sums[:n], sums[n:], tokens[:n], tokens[n:])


def reference_logps(peft_model: Any, pair_batch: PairBatch, device: torch.device, precision: str = "no"
                    ) -> AnswerLogps:
    """The log-probs under the base model: the adapter switched off, no gradients."""
    with torch.no_grad(), peft_model.disable_adapter():
        return answer_logps(peft_model.get_base_model(), pair_batch, device, precision)


def dpo_loss(policy: AnswerLogps, reference: AnswerLogps, beta: float) -> PreferenceLoss:
    chosen_reward = policy.chosen - reference.chosen
    rejected_reward = policy.rejected - reference.rejected
    logits = beta * (chosen_reward - rejected_reward)
    return PreferenceLoss(-F.logsigmoid(logits), logits.detach())


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy: AnswerLogps, lam: float) -> PreferenceLoss:
    chosen, rejected = policy.means()
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    return PreferenceLoss(-chosen + lam * -F.logsigmoid(log_odds), log_odds.detach())


def pair_loss(method: str, peft_model: Any, pair_batch: PairBatch, device: torch.device, precision: str,
              beta: float, policy_model: Any = None) -> PreferenceLoss:
    """The `method` (dpo | orpo) loss of each comparison in `pair_batch`, with the policy's gradients.

    `policy_model`: what the policy's forward goes through when training (the trained
    `AnswerModel`, DDP-wrapped in several processes); by default the PEFT model itself.
    """
    reference = reference_logps(peft_model, pair_batch, device, precision) if method == "dpo" else None
    policy = answer_logps(policy_model if policy_model is not None else peft_model.get_base_model(),
                          pair_batch, device, precision)
    if reference is not None:
        return dpo_loss(policy, reference, beta)
    return orpo_loss(policy, beta)


@torch.no_grad()
def answer_margins(peft_model: Any, batches: list[PairBatch], device: torch.device, precision: str = "no"
                   ) -> torch.Tensor:
    """logp(chosen) - logp(rejected) (summed answer log-probs) of every comparison, in eval mode."""
    causal_lm = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    was_training = causal_lm.training
    causal_lm.eval()
    margins = []
    try:
        for batch in batches:
            logps = answer_logps(causal_lm, batch, device, precision)
            margins.append(logps.chosen - logps.rejected)
    finally:
        if was_training:
            causal_lm.train()
    return torch.cat(margins) if margins else torch.zeros(0)


# --- what the DPO / ORPO and KTO runs share ----------------------------------------------------------

def read_split(cfg: Any, load: Callable[[str], list]) -> tuple[list, list]:
    """The rows of train_data_dir read by `load`, and the held-out ones: validation_file's, else a
    validation_split share of them (the same seeded split as SFT)."""
    from core.data import text as text_data

    rows = load(cfg.train_data_dir)
    if cfg.validation_file:
        return rows, load(cfg.validation_file)
    return text_data.split_validation(rows, cfg.validation_split, cfg.seed)


def epoch_item_batches(items: Sequence[Any], cfg: Any, epoch: int, shard: Callable[[list], list], pad_id: int,
                       make: Callable[[list, int], Any]) -> list[Any]:
    """One epoch's batches of `items` (each built by `make`), grouped by length when padding would be large."""
    lengths = [len(item) for item in items]
    grouped = lengths if max(lengths) * cfg.batch_size > MAX_PACKED_TOKENS else None
    order = shard(epoch_batches(len(lengths), cfg.batch_size, cfg.seed, epoch, grouped))
    return [make([items[i] for i in indices], pad_id) for indices in order]


def mean_or_zero(values: torch.Tensor) -> float:
    """The mean of `values` as a float; 0 for none (a batch without desirable answers, say)."""
    return float(values.float().mean()) if values.numel() else 0.0
