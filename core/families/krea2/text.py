"""Krea 2 prompts: the stacked Qwen3-VL hidden states of `Krea2Pipeline.get_text_hidden_states`, kept for the real
tokens only ([L_i, layers, hidden] per caption; the padding the pipeline puts between prompt and suffix is dropped,
which changes nothing: text tokens carry no position in the transformer and padded ones are masked out); a batch
is padded again at the end with a mask. Cached once (core.families.dit.prompt_cache).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.families.krea2.load import MAX_SEQUENCE_LENGTH


def encoder_pipeline(model: Any) -> Any:
    """A Krea2Pipeline holding only the text encoder and tokenizer: its own encoding, exactly."""
    from diffusers import Krea2Pipeline

    return Krea2Pipeline(scheduler=None, vae=None, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                         transformer=None, text_encoder_select_layers=model.text_layers)


@torch.no_grad()
def encode_prompts(model: Any, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L, layers, hidden], mask [B, L]) as the pipeline computes them."""
    device = next(model.text_encoder.parameters()).device
    return encoder_pipeline(model).get_text_hidden_states(list(captions), MAX_SEQUENCE_LENGTH, device)


def encode_entries(model: Any, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
    embeds, mask = encode_prompts(model, captions)
    return [{"prompt_embeds": e[m]} for e, m in zip(embeds, mask)]


def stack(entries: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [B, L_max, layers, hidden] padded at the end with zeros, mask [B, L_max])."""
    longest = max(e["prompt_embeds"].shape[0] for e in entries)
    first = entries[0]["prompt_embeds"]
    embeds = first.new_zeros((len(entries), longest, *first.shape[1:]))
    mask = torch.zeros(len(entries), longest, dtype=torch.bool)
    for i, e in enumerate(entries):
        n = e["prompt_embeds"].shape[0]
        embeds[i, :n] = e["prompt_embeds"]
        mask[i, :n] = True
    return embeds, mask


def prompt_identity(model: Any) -> str:
    from core.families.dit.prompt_cache import encoder_identity

    return encoder_identity(model.text_encoder, settings=f"krea2|{MAX_SEQUENCE_LENGTH}|{model.text_layers}")
