"""Wan prompts: UMT5-XXL's last hidden state of the cleaned prompt (WanPipeline._get_t5_prompt_embeds), the real
tokens kept ([L, 4096] per caption in the disk cache) and zero-padded to 512 tokens when batched, as the
pipeline does (the transformer sees no mask: the zeros are what it was trained with).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.families.wan.load import MAX_SEQUENCE_LENGTH


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, captions: Sequence[str], *,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> list[torch.Tensor]:
    """One [L_i, D] tensor per caption: the encoder's last hidden state of its real tokens."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    device = next(text_encoder.parameters()).device
    inputs = tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=max_sequence_length,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = inputs.attention_mask
    lengths = mask.gt(0).sum(dim=1).long()
    hidden = text_encoder(inputs.input_ids.to(device), mask.to(device)).last_hidden_state
    return [h[:n].float().cpu() for h, n in zip(hidden, lengths)]


def pad(embeds: Sequence[torch.Tensor], length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """[B, 512, D]: each caption's tokens then zeros (the pipeline's prompt_embeds)."""
    return torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])


def encode_entries(model: Any, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{"prompt_embeds": e} for e in encode_prompts(model.text_encoder, model.tokenizer, captions)]


def stack(entries: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    return pad([e["prompt_embeds"] for e in entries])


def prompt_identity(model: Any) -> str:
    from core.families.dit.prompt_cache import encoder_identity

    return encoder_identity(model.text_encoder, settings=f"wan|{MAX_SEQUENCE_LENGTH}")
