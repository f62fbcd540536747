"""FLUX.2 prompts, exactly as the pipelines encode them; one [512, 3 x hidden] tensor per caption, cached once
(core.families.dit.prompt_cache) and the encoder freed before the transformer trains.

- klein: Qwen3's hidden states of layers 9, 18, 27 concatenated per token, over the chat template padded to
  512 tokens (`Flux2KleinPipeline._get_qwen3_prompt_embeds`, padding kept: the transformer sees all 512).
- dev: Mistral-Small 3.1's hidden states of layers 10, 20, 30 (3 x 5120 = 15360 wide), over its chat template
  with BFL's system message (diffusers' flux2/system_messages.py) padded to 512 tokens
  (`Flux2Pipeline._get_mistral_3_small_prompt_embeds`). The encoder is Mistral3's language model alone
  (MistralModel): for text the multimodal model returns its hidden states unchanged. It runs a layer at a time
  on the device (core.families.dit.streamed_encoder): 46 GB of bf16 weights do not fit a 24 GB card whole.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.families.flux2.load import DEV_TEXT_LAYERS, MAX_SEQUENCE_LENGTH, TEXT_LAYERS


@torch.no_grad()
def encode_prompts(text_encoder: Any, tokenizer: Any, captions: Sequence[str], variant: str = "flux2-klein-4b",
                   device: torch.device | None = None) -> torch.Tensor:
    """[B, 512, 3 x hidden]: exactly the pipeline's prompt embeddings (dev's or klein's by `variant`), computed on
    `device` (default: the encoder's; dev's streams its layers there)."""
    device = next(text_encoder.parameters()).device if device is None else torch.device(device)
    if variant == "flux2-dev":
        from diffusers import Flux2Pipeline
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(  # noqa: SLF001 - the pipeline's exact encoding
            text_encoder, tokenizer, list(captions), device=device, max_sequence_length=MAX_SEQUENCE_LENGTH,
            system_message=SYSTEM_MESSAGE, hidden_states_layers=DEV_TEXT_LAYERS)
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._get_qwen3_prompt_embeds(  # noqa: SLF001 - the pipeline's exact encoding
        text_encoder, tokenizer, list(captions), device=device, max_sequence_length=MAX_SEQUENCE_LENGTH,
        hidden_states_layers=TEXT_LAYERS)


def encode_entries(model: Any, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
    # dev's encoder streams its layers to `device` (core.families.dit.streamed_encoder); klein's is already there.
    at = device if model.variant == "flux2-dev" else None
    encoded = encode_prompts(model.text_encoder, model.tokenizer, captions, model.variant, at)
    return [{"prompt_embeds": e} for e in encoded]


def stack(entries: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([e["prompt_embeds"] for e in entries])


def prompt_identity(model: Any) -> str:
    from core.families.dit.prompt_cache import encoder_identity

    layers = DEV_TEXT_LAYERS if model.variant == "flux2-dev" else TEXT_LAYERS
    # klein's settings string is kept as it was, so the caches written before dev existed stay valid.
    return encoder_identity(model.text_encoder, settings=f"flux2|{MAX_SEQUENCE_LENGTH}|{layers}")
