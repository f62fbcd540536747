"""Wan prompts: UMT5-XXL's last hidden state of the cleaned prompt (WanPipeline._get_t5_prompt_embeds), the real
tokens kept ([L, 4096] per caption in the disk cache) and zero-padded to 512 tokens when batched, as the
pipeline does (the transformer sees no mask: the zeros are what it was trained with). Wan 2.1 I2V: a run keys
its prompts by (caption, item path, first frame), and the entry adds the start image's CLIP ViT-H features
(core.families.wan.i2v.clip_features), computed from the item's first frame as the pipeline's `encode_image`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class WanCondition:
    """A batch's prompts with Wan 2.1 I2V's CLIP features of each item's start image."""

    prompt_embeds: torch.Tensor   # [B, 512, D]
    image_embeds: torch.Tensor    # [B, 257, 1280]


def start_picture(path: str, frame: int) -> Any:
    """An item's start image: its first frame of the window it trains (frame -1: the image itself)."""
    from core.data.image_io import load_rgb
    from core.data.video_io import read_frames

    return load_rgb(Path(path)) if frame < 0 else read_frames(path, (frame,))[0]


def encode_entries(model: Any, keys: list[Any], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """A caption's UMT5 encoding; a (caption, path, first frame) key's also the start image's CLIP features."""
    captions = [k[0] if isinstance(k, tuple) else k for k in keys]
    entries = [{"prompt_embeds": e} for e in encode_prompts(model.text_encoder, model.tokenizer, captions)]
    items = [(n, k) for n, k in enumerate(keys) if isinstance(k, tuple)]
    if items and getattr(model, "image_encoder", None) is not None:
        from core.families.wan.i2v import clip_features
        from core.sample import move

        move(model.image_encoder, device)
        features = clip_features(model, [start_picture(path, frame) for _, (_, path, frame) in items])
        move(model.image_encoder, "cpu")  # the previews' pipeline encodes their start image with it there
        for (n, _), feature in zip(items, features):
            entries[n]["image_embeds"] = feature.cpu()
    return entries


def stack(entries: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor | WanCondition:
    prompts = pad([e["prompt_embeds"] for e in entries])
    if "image_embeds" in entries[0]:
        return WanCondition(prompts, torch.stack([e["image_embeds"] for e in entries]))
    return prompts


def prompt_identity(model: Any) -> str:
    from core.families.dit.prompt_cache import encoder_identity

    image = getattr(model, "image_encoder", None)  # Wan 2.1 I2V's entries hold its features too
    return encoder_identity(model.text_encoder, *([image] if image is not None else []),
                            settings=f"wan|{MAX_SEQUENCE_LENGTH}")
