"""SD3 / SD3.5 prompts: CLIP-L + CLIP-G (penultimate hidden states and pooled projections) and T5-XXL
(256 tokens; zeros without it), encoded as StableDiffusion3Pipeline.encode_prompt does; one prompt-cache
entry per caption (core.families.dit.prompt_cache) and the batches stacked from them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SD3Prompts:
    """One batch of encoded prompts."""

    prompt_embeds: torch.Tensor   # [B, 77 + 256, 4096] CLIP-L | CLIP-G side by side, then T5
    pooled: torch.Tensor          # [B, 2048] both CLIPs' pooled projections

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SD3Prompts:
        return SD3Prompts(self.prompt_embeds.to(device=device, dtype=dtype or self.prompt_embeds.dtype),
                          self.pooled.to(device=device, dtype=dtype or self.pooled.dtype))

    def entries(self) -> list[dict[str, torch.Tensor]]:
        return [{"prompt_embeds": e, "pooled": p} for e, p in zip(self.prompt_embeds, self.pooled)]


def stack(items: Sequence[Mapping[str, torch.Tensor]]) -> SD3Prompts:
    return SD3Prompts(torch.stack([i["prompt_embeds"] for i in items]), torch.stack([i["pooled"] for i in items]))


def _encode_pipe(model: Any) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=model.transformer, scheduler=None, vae=None,
                                    text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                    text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                                    text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)


@torch.no_grad()
def encode_prompts(model: Any, captions: list[str], device: torch.device) -> Any:
    """StableDiffusion3Pipeline.encode_prompt's [B, 77 + 256, 4096] sequence and [B, 2048] pooled vector."""
    from core.families.sd3.load import T5_MAX_LENGTH

    pipe = _encode_pipe(model)
    encoder_device = next(model.text_encoder.parameters()).device
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None,
                                              device=encoder_device, do_classifier_free_guidance=False,
                                              max_sequence_length=T5_MAX_LENGTH)
    return SD3Prompts(embeds, pooled)


def encode_entries(model: Any, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return encode_prompts(model, captions, device).entries()


def prompt_identity(model: Any) -> str:
    from core.families.dit.prompt_cache import encoder_identity
    from core.families.sd3.load import T5_MAX_LENGTH

    return encoder_identity(model.text_encoder, model.text_encoder_2, model.text_encoder_3,
                            settings=f"sd3-{model.model_type}|{T5_MAX_LENGTH}")
