"""FLUX.2 klein prompts: Qwen3's hidden states of layers 9, 18, 27 concatenated per token, over the chat
template padded to 512 tokens (`Flux2KleinPipeline._get_qwen3_prompt_embeds`, padding kept: the
transformer sees all 512); one [512, 3 x hidden] tensor per caption, cached once (core.families.dit.prompt_cache).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.families.flux2.load import MAX_SEQUENCE_LENGTH, TEXT_LAYERS


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """[B, 512, 3 x hidden]: exactly the pipeline's prompt embeddings."""
    from diffusers import Flux2KleinPipeline

    device = next(text_encoder.parameters()).device
    return Flux2KleinPipeline._get_qwen3_prompt_embeds(  # noqa: SLF001 - the pipeline's exact encoding
        text_encoder, tokenizer, list(captions), device=device, max_sequence_length=MAX_SEQUENCE_LENGTH,
        hidden_states_layers=TEXT_LAYERS)


def encode_entries(model: Any, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{"prompt_embeds": e} for e in encode_prompts(model.text_encoder, model.tokenizer, captions)]


def stack(entries: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([e["prompt_embeds"] for e in entries])


def prompt_identity(model: Any) -> str:
    from core.families.dit.prompt_cache import encoder_identity

    return encoder_identity(model.text_encoder, settings=f"flux2|{MAX_SEQUENCE_LENGTH}|{TEXT_LAYERS}")
