"""FLUX / Chroma prompt encoding, its per-caption disk cache, and freeing the encoders.

FLUX.1 conditions on CLIP-L's pooled output (one vector) and T5-XXL's token sequence;
the text position ids are all zeros. Chroma drops CLIP and masks T5's padding, keeping
one padding token visible (what its pipeline does). The encoders are frozen and large
(T5-XXL is 4.7 B parameters), so each caption is encoded once, cached on disk, and the
encoders are freed before the transformer trains.
"""
from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch

from core.atomic import atomic_path

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


def stack_embeds(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """One batch from per-caption cache entries (text ids are shared, not stacked)."""
    pooled = [i.pooled for i in items]
    masks = [i.attention_mask for i in items]
    return PromptEmbeds(torch.stack([i.prompt_embeds for i in items]),
                        None if pooled[0] is None else torch.stack(pooled), items[0].text_ids,
                        None if masks[0] is None else torch.stack(masks))


def _fingerprint(module: Any) -> bytes:
    # Config + the shape and first values of three tensors: tells encoders apart without hashing 9 GB of T5.
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    parts = [json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True,
                        default=str).encode()]
    params = list(module.state_dict().items())
    for name, tensor in [params[0], params[len(params) // 2], params[-1]]:
        head = tensor.detach().reshape(-1)[:4096].float().cpu().contiguous()
        parts += [f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode(), head.numpy().tobytes()]
    return b"|".join(parts)


def encoder_identity(*modules: Any, max_sequence_length: int, variant: str) -> str:
    """What the cached encodings depend on: both encoders' fingerprints, the T5 length, the variant."""
    digest = hashlib.sha256(f"{variant}|{max_sequence_length}".encode())
    for module in modules:
        digest.update(b"none" if module is None else _fingerprint(module))
    return digest.hexdigest()[:16]


def _cache_file(cache_dir: Path, caption: str, identity: str) -> Path:
    key = hashlib.sha256((identity + "\n" + caption).encode()).hexdigest()[:32]
    return cache_dir / f"{key}.safetensors"


def _read_entry(path: Path, caption: str) -> PromptEmbeds | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("caption") != caption:
                return None  # a hash collision or a foreign file: encode again
            keys = set(handle.keys())
            get = handle.get_tensor
            return PromptEmbeds(get("prompt_embeds"), get("pooled") if "pooled" in keys else None,
                                get("text_ids"), get("attention_mask") if "attention_mask" in keys else None)
    except Exception:  # noqa: BLE001 - a damaged cache file is simply encoded again
        return None


def _write_entry(path: Path, caption: str, entry: PromptEmbeds) -> None:
    from safetensors.torch import save_file

    tensors = {"prompt_embeds": entry.prompt_embeds, "text_ids": entry.text_ids}
    if entry.pooled is not None:
        tensors["pooled"] = entry.pooled
    if entry.attention_mask is not None:
        tensors["attention_mask"] = entry.attention_mask
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"caption": caption})


def cache_prompt_embeds(captions: Sequence[str], encode: Callable[[list[str]], PromptEmbeds],
                        cache_dir: str | Path | None, identity: str, *, batch_size: int = 8
                        ) -> tuple[dict[str, PromptEmbeds], int]:
    """Per-caption encodings from `cache_dir/<identity>/` or `encode`; returns (by caption, cache hits).

    Entries are keyed by caption + encoder identity and written atomically, so another run
    (other output folder, other settings) reuses them and another encoder never reads them.
    """
    folder = Path(cache_dir) / identity if cache_dir is not None else None
    out: dict[str, PromptEmbeds] = {}
    todo: list[str] = []
    for caption in dict.fromkeys(captions):
        entry = _read_entry(_cache_file(folder, caption, identity), caption) if folder else None
        if entry is None:
            todo.append(caption)
        else:
            out[caption] = entry
    hits = len(out)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        batch = encode(chunk)
        for i, caption in enumerate(chunk):
            entry = PromptEmbeds(batch.prompt_embeds[i].detach().cpu(),
                                 None if batch.pooled is None else batch.pooled[i].detach().cpu(),
                                 batch.text_ids.detach().cpu(),
                                 None if batch.attention_mask is None else batch.attention_mask[i].detach().cpu())
            out[caption] = entry
            if folder is not None:
                _write_entry(_cache_file(folder, caption, identity), caption, entry)
    return out, hits


def free_text_encoders(model: Any) -> int:
    """Drop the text encoders of a FluxModel (after caching); returns the parameters freed.

    The modules go to the meta device first, so their memory is released even if some
    other object still holds a reference; then gc and the CUDA cache are emptied.
    """
    freed = 0
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(model, name, None)
        if module is None:
            continue
        freed += sum(p.numel() for p in module.parameters())
        module.to("meta")
        setattr(model, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed
