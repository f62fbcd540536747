"""FLUX / Chroma prompt encoding and the batches of its cached encodings.

FLUX.1 conditions on CLIP-L's pooled output (one vector) and T5-XXL's token sequence;
the text position ids are all zeros. Chroma drops CLIP and masks T5's padding, keeping
one padding token visible (what its pipeline does). The encoders are frozen and large
(T5-XXL is 4.7 B parameters), so each caption is encoded once, cached on disk, and the
encoders are freed before the transformer trains (core.families.dit.prompt_cache).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# T5 tokens per prompt: FLUX.1-dev and Chroma were trained with 512, schnell with 256.
MAX_SEQUENCE_LENGTH = {"flux-dev": 512, "flux-schnell": 256, "chroma": 512, "flux-kontext": 512}


@dataclass
class PromptEmbeds:
    """One batch of encoded prompts (or one caption's, without the batch dimension, in the cache)."""

    prompt_embeds: torch.Tensor          # [B, S, 4096] T5 hidden states
    pooled: torch.Tensor | None          # [B, 768] CLIP-L pooled output; None for Chroma
    text_ids: torch.Tensor               # [S, 3] zeros: text tokens have no 2-D position
    attention_mask: torch.Tensor | None  # [B, S] 1 = attend; Chroma only

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        def move(t: torch.Tensor | None, cast: bool = True) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast and dtype is not None else t.dtype)

        return PromptEmbeds(move(self.prompt_embeds), move(self.pooled), move(self.text_ids),
                            move(self.attention_mask, cast=False))

    def entries(self) -> list[dict[str, torch.Tensor]]:
        """One prompt-cache entry per caption (core.families.dit.prompt_cache): its tensors without the batch axis."""
        out = []
        for i in range(self.prompt_embeds.shape[0]):
            entry = {"prompt_embeds": self.prompt_embeds[i], "text_ids": self.text_ids}
            if self.pooled is not None:
                entry["pooled"] = self.pooled[i]
            if self.attention_mask is not None:
                entry["attention_mask"] = self.attention_mask[i]
            out.append(entry)
        return out


def _device_of(module: Any) -> torch.device:
    return next(module.parameters()).device


def text_ids(seq_len: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FLUX's text position ids: [seq_len, 3] zeros (as FluxPipeline.encode_prompt builds them)."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def chroma_mask(tokenizer_mask: torch.Tensor) -> torch.Tensor:
    """Chroma's text mask: the real tokens plus the first padding token (ChromaPipeline's rule)."""
    lengths = tokenizer_mask.sum(dim=1)
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device).unsqueeze(0)
    return (positions <= lengths.unsqueeze(1)).to(tokenizer_mask.dtype)


@torch.no_grad()
def encode_prompts(text_encoder: Any | None, tokenizer: Any | None, t5: Any, t5_tokenizer: Any,
                   captions: Sequence[str], *, max_sequence_length: int = 512, chroma: bool = False
                   ) -> PromptEmbeds:
    """CLIP pooled + T5 sequence embeddings of `captions` (FluxPipeline / ChromaPipeline semantics)."""
    captions = list(captions)
    pooled = None
    if text_encoder is not None and not chroma:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        pooled = text_encoder(ids.to(_device_of(text_encoder)), output_hidden_states=False).pooler_output
    tokens = t5_tokenizer(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                          return_tensors="pt")
    device = _device_of(t5)
    mask = None
    if chroma:
        # Unlike FLUX, Chroma encodes with the padding masked out and masks it again in the transformer.
        mask_in = tokens.attention_mask.to(device)
        embeds = t5(tokens.input_ids.to(device), attention_mask=mask_in, output_hidden_states=False)[0]
        mask = chroma_mask(mask_in)
    else:
        embeds = t5(tokens.input_ids.to(device), output_hidden_states=False)[0]
    return PromptEmbeds(embeds, pooled, text_ids(embeds.shape[1], embeds.device, embeds.dtype), mask)


def stack_embeds(items: Sequence[Mapping[str, torch.Tensor]]) -> PromptEmbeds:
    """One batch from per-caption cache entries (`PromptEmbeds.entries`; text ids are shared, not stacked)."""
    def stacked(name: str) -> torch.Tensor | None:
        return torch.stack([i[name] for i in items]) if name in items[0] else None

    return PromptEmbeds(torch.stack([i["prompt_embeds"] for i in items]), stacked("pooled"), items[0]["text_ids"],
                        stacked("attention_mask"))
