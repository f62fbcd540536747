"""The prompt-embedding disk cache of the transformer families, and freeing the text encoders after it.

Their text encoders are frozen and large (billions of parameters), so each prompt is encoded once, its
tensors cached on disk beside the data (`<cache>/<identity>/<hash>.safetensors`, the prompt in the
header), and the encoders are freed before the transformer trains. An entry is the prompt's named
tensors without a batch dimension; the family stacks entries into its own conditioning.
The identity covers the encoders' fingerprints and the family's settings, so another encoder or
another length never reads an entry, and another run (other output folder) reuses them.
"""
from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_path
from core.config import TrainConfig

Entry = dict[str, torch.Tensor]
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def fingerprint(module: Any) -> bytes:
    """Config + the shape and first values of three tensors: tells encoders apart without hashing 9 GB of T5."""
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    parts = [json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True,
                        default=str).encode()]
    params = list(module.state_dict().items())
    for name, tensor in [params[0], params[len(params) // 2], params[-1]]:
        head = tensor.detach().reshape(-1)[:4096].float().cpu().contiguous()
        parts += [f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode(), head.numpy().tobytes()]
    return b"|".join(parts)


def encoder_identity(*modules: Any, settings: str) -> str:
    """What the cached encodings depend on: the family's `settings` (variant, token length) and each
    encoder's fingerprint (None: an encoder the model lacks)."""
    digest = hashlib.sha256(settings.encode())
    for module in modules:
        digest.update(b"none" if module is None else fingerprint(module))
    return digest.hexdigest()[:16]


def prompts_to_encode(keys: Sequence[Hashable], cfg: TrainConfig) -> list[Hashable]:
    """The captions' keys, then the sample prompts and the negative prompt (the previews need no encoder)."""
    return list(keys) + list(cfg.sample_prompts) + ([cfg.sample_negative_prompt or ""] if cfg.sample_prompts else [])


def cache_file(folder: Path, text: str, identity: str) -> Path:
    key = hashlib.sha256((identity + "\n" + text).encode()).hexdigest()[:32]
    return folder / f"{key}.safetensors"


def _read_entry(path: Path, text: str) -> Entry | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("caption") != text:
                return None  # a hash collision or a foreign file: encode again
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception:  # noqa: BLE001 - a missing or damaged cache file is simply encoded again
        return None


def _write_entry(path: Path, text: str, entry: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(entry), str(tmp), metadata={"caption": text})


def cache_encodings(keys: Sequence[Hashable], encode: Callable[[list[Any]], Sequence[Mapping[str, torch.Tensor]]],
                    cache_dir: str | Path | None, identity: str, *, key_text: Callable[[Any], str] = str,
                    batch_size: int = 8) -> tuple[dict[Any, Entry], int]:
    """Each key's entry from `cache_dir/<identity>/` or `encode` (a list of keys -> one entry per key, in
    order, batches of `batch_size`); returns ({key: entry}, cache hits). `key_text` is what a key is
    stored under (a caption; with an image, its path and time stamp too). Entries are written atomically.
    """
    folder = Path(cache_dir) / identity if cache_dir is not None else None
    out: dict[Any, Entry] = {}
    todo: list[Any] = []
    for key in dict.fromkeys(keys):
        entry = _read_entry(cache_file(folder, key_text(key), identity), key_text(key)) if folder else None
        if entry is None:
            todo.append(key)
        else:
            out[key] = entry
    hits = len(out)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for key, encoded in zip(chunk, encode(chunk)):
            entry = {name: t.detach().cpu().contiguous() for name, t in encoded.items() if t is not None}
            out[key] = entry
            if folder is not None:
                _write_entry(cache_file(folder, key_text(key), identity), key_text(key), entry)
    return out, hits


def free_text_encoders(model: Any, names: Sequence[str] = TEXT_ENCODER_NAMES) -> int:
    """Drop a model's text encoders (after caching); returns the parameters freed.

    The modules go to the meta device first, so their memory is released even if some other
    object still holds a reference; then gc and the CUDA cache are emptied.
    """
    freed = 0
    for name in names:
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
