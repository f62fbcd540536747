"""Qwen-Image prompts: Qwen2.5-VL-7B's last hidden states of the chat template without its first tokens (Edit: with
the control image through the VL processor), one [L, 3584] tensor per caption, padded and masked in a batch;
cached once (core.families.dit.prompt_cache).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.families.qwen_image.load import (EDIT_PLUS, MAX_PROMPT_TOKENS, PICTURE_TEMPLATE, PROMPT_TEMPLATE,
                                           TEMPLATE_DROP, TRAIN_PROMPT_TOKENS)


@dataclass
class QwenPrompts:
    """Encoded prompts: per-caption hidden states, padded to one length, and the mask of real tokens."""

    embeds: torch.Tensor          # [B, S, D]
    mask: torch.Tensor            # [B, S] 1 = token, 0 = padding

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> QwenPrompts:
        return QwenPrompts(self.embeds.to(device=device, dtype=dtype or self.embeds.dtype), self.mask.to(device))


def stack_prompts(items: Sequence[torch.Tensor]) -> QwenPrompts:
    """One batch from per-caption hidden states [L_i, D]: zero-padded, mask 1 on the real tokens."""
    length = max(int(t.shape[0]) for t in items)
    embeds = torch.stack([torch.cat([t, t.new_zeros(length - t.shape[0], t.shape[1])]) for t in items])
    mask = torch.stack([torch.cat([torch.ones(t.shape[0], dtype=torch.long),
                                   torch.zeros(length - t.shape[0], dtype=torch.long)]) for t in items])
    return QwenPrompts(embeds, mask)


@torch.no_grad()
def encode_prompt_list(text_encoder: Any, tokenizer: Any, captions: Sequence[str], *, variant: str = "qwen-image",
                       processor: Any = None, images: Sequence[Any] | None = None,
                       max_tokens: int = TRAIN_PROMPT_TOKENS) -> list[torch.Tensor]:
    """Each caption's last-layer hidden states without the template tokens: [L_i, D] (pipeline semantics).

    Edit: `images` (PIL, one per caption) go through the VL processor with the text, as
    QwenImageEditPipeline._get_qwen_prompt_embeds does; Edit Plus (2509 / 2511): a list of 0..N images per caption.
    """
    if variant in EDIT_PLUS:
        # QwenImageEditPlusPipeline encodes one prompt at a time with its own 1..N pictures (or none).
        return [_encode_plus(text_encoder, tokenizer, caption, list(refs or []), variant=variant,
                             processor=processor, max_tokens=max_tokens)
                for caption, refs in zip(captions, images or [None] * len(captions))]
    template, drop = PROMPT_TEMPLATE[variant], TEMPLATE_DROP[variant]
    text = [template.format(c) for c in captions]
    device = next(text_encoder.parameters()).device
    if variant == "qwen-image-edit":
        if processor is None or images is None:
            raise ValueError("Qwen-Image-Edit encodes each caption with its control image; none was given.")
        inputs = processor(text=text, images=list(images), padding=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                           output_hidden_states=True)
        mask = inputs["attention_mask"]
    else:
        tokens = tokenizer(text, max_length=MAX_PROMPT_TOKENS + drop, padding=True, truncation=True,
                           return_tensors="pt").to(device)
        out = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           output_hidden_states=True)
        mask = tokens.attention_mask
    hidden = out.hidden_states[-1]
    result = []
    for row, row_mask in zip(hidden, mask.bool()):
        result.append(row[row_mask][drop:][:max_tokens].detach())
    return result


def _encode_plus(text_encoder: Any, tokenizer: Any, caption: str, images: list[Any], *, variant: str,
                 processor: Any, max_tokens: int) -> torch.Tensor:
    """One Edit Plus prompt: "Picture k: <vision tokens>" per image, then the caption, in the template
    (QwenImageEditPlusPipeline._get_qwen_prompt_embeds); a plain image's prompt has no pictures."""
    pictures = "".join(PICTURE_TEMPLATE.format(k + 1) for k in range(len(images)))
    text = [PROMPT_TEMPLATE[variant].format(pictures + caption)]
    device = next(text_encoder.parameters()).device
    if images:
        if processor is None:
            raise ValueError(f"{variant} encodes each caption with its reference images; no VL processor was loaded.")
        inputs = {k: v.to(device) for k, v in processor(text=text, images=images, return_tensors="pt").items()}
    else:
        inputs = {k: v.to(device) for k, v in tokenizer(text, return_tensors="pt").items()}
    out = text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                       output_hidden_states=True)
    row = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()]
    return row[TEMPLATE_DROP[variant]:][:max_tokens].detach()


class VLProcessor:
    """Qwen2VLProcessor's image-and-text step: the image processor's patches, `<|image_pad|>` repeated
    once per merged patch (grid t*h*w / merge_size^2), then the tokenizer. transformers' own processor
    needs torchvision for its video half, which an image trainer has no use for."""

    def __init__(self, image_processor: Any, tokenizer: Any, image_token: str = "<|image_pad|>"):
        self.image_processor, self.tokenizer, self.image_token = image_processor, tokenizer, image_token

    def __call__(self, *, text: Sequence[str], images: Any, padding: bool = True, return_tensors: str = "pt") -> Any:
        from transformers import BatchFeature

        images = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = self.image_processor(images=images, return_tensors=return_tensors)
        merge = int(self.image_processor.merge_size) ** 2
        counts = iter(int(g.prod()) // merge for g in pixels["image_grid_thw"])
        expanded = []
        for line in text:
            parts = line.split(self.image_token)
            out = parts[0]
            for part in parts[1:]:
                out += self.image_token * next(counts) + part
            expanded.append(out)
        tokens = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        return BatchFeature({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                             "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]})


def load_vl_processor(source: str, tokenizer: Any, local: bool) -> VLProcessor:
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(source, subfolder="processor", local_files_only=local)
    return VLProcessor(image_processor, tokenizer)
