"""Batches for text LoRA without compute spent on padding.

A batch of `batch_size` examples is packed into one row: the examples follow each other,
`position_ids` restart at 0 for each, and transformers turns those restarts into a
block-diagonal causal mask (no example sees another). When a packed row would be very
long (attention cost grows with its square), the batch is instead padded per row from
length-grouped examples, so the padding is a few tokens at most.

The epoch order is a seeded permutation, so a resumed run replays the same batches.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from core.data.text import IGNORE_INDEX, TokenizedExample

MAX_PACKED_TOKENS = 4096


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (rows, length)
    labels: torch.Tensor  # (rows, length), IGNORE_INDEX where no loss; already aligned to input_ids
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when packed (the mask comes from position_ids)
    tokens: int  # real tokens in the batch (no padding)
    trained_tokens: int


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """Example indices for each batch of `epoch`, shuffled with (seed, epoch).

    With `lengths`, examples are grouped by length inside windows of 50 batches
    (like HF's LengthGroupedSampler) so padded batches waste little.
    """
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if lengths is not None:
        window = batch_size * 50
        order = [i for start in range(0, count, window)
                 for i in sorted(order[start:start + window], key=lambda j: -lengths[j])]
    batches = [order[start:start + batch_size] for start in range(0, count, batch_size)]
    if lengths is not None:
        random.Random(seed + epoch).shuffle(batches)
    return batches


def _shifted_labels(example: TokenizedExample) -> list[int]:
    # Position t predicts token t+1; the last position of each example predicts nothing,
    # which is also what keeps packed examples from learning across their border.
    return [*example.labels[1:], IGNORE_INDEX]


def pack(examples: list[TokenizedExample]) -> TextBatch:
    """One row: the examples back to back with restarting position ids."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        ids.extend(example.input_ids)
        labels.extend(_shifted_labels(example))
        positions.extend(range(len(example)))
    labels_t = torch.tensor([labels])
    return TextBatch(torch.tensor([ids]), labels_t, torch.tensor([positions]), None, len(ids),
                     int((labels_t != IGNORE_INDEX).sum()))


def pad(examples: list[TokenizedExample], pad_id: int) -> TextBatch:
    """Right-padded rows with an attention mask (for batches too long to pack)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(_shifted_labels(example))
        mask[row, :n] = 1
    positions = torch.arange(width).unsqueeze(0).expand(len(examples), -1).contiguous()
    return TextBatch(ids, labels, positions, mask, int(mask.sum()), int((labels != IGNORE_INDEX).sum()))


def make_batch(examples: list[TokenizedExample], pad_id: int, max_packed: int = MAX_PACKED_TOKENS) -> TextBatch:
    if len(examples) == 1 or sum(len(e) for e in examples) <= max_packed:
        return pack(examples)
    return pad(examples, pad_id)
