"""Z-Image prompts: Qwen3-4B's second-to-last hidden states of the real tokens (ZImagePipeline's encoding),
one variable-length [L, 2560] tensor per caption; cached once (core.families.dit.prompt_cache).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.families.zimage.load import MAX_SEQUENCE_LENGTH


def chat_prompts(tokenizer: Any, captions: Sequence[str]) -> list[str]:
    """The pipeline's prompt text: Qwen's chat template with the generation prompt, thinking enabled."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True) for c in captions]


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, captions: Sequence[str], *,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> list[torch.Tensor]:
    """One [L_i, D] tensor per caption: hidden_states[-2] of its real tokens (ZImagePipeline._encode_prompt)."""
    device = next(text_encoder.parameters()).device
    inputs = tokenizer(chat_prompts(tokenizer, captions), padding="max_length", max_length=max_sequence_length,
                       truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.to(device).bool()
    hidden = text_encoder(input_ids=inputs.input_ids.to(device), attention_mask=mask,
                          output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(hidden.shape[0])]


def encode_entries(model: Any, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{"prompt_embeds": e} for e in encode_prompts(model.text_encoder, model.tokenizer, captions)]


def stack(entries: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The transformer takes a list of per-caption tensors (no padding)."""
    return [e["prompt_embeds"] for e in entries]


def prompt_identity(model: Any) -> str:
    from core.families.dit.prompt_cache import encoder_identity

    return encoder_identity(model.text_encoder, settings=f"zimage|{MAX_SEQUENCE_LENGTH}|{model.variant}")
