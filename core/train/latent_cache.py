"""Encode each training image once: VAE latents in memory and on disk, captions once per run.

The disk cache is keyed by the image file's content hash, its bucket, the crop mode and
the VAE's identity, so a later run (another output folder, other settings) reuses it and
an edited image or another VAE never gets stale latents. Files are written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import torch

from core.atomic import atomic_path
from core.data.buckets import Bucket, PreparedImage, prepare_image
from core.data.image_io import ImageReadError, load_rgb

CACHE_DIRNAME = ".lora_cache"


@dataclass
class CachedImage:
    moments: torch.Tensor  # [2C, h, w] VAE mean and logvar, fp32, CPU
    original_size: tuple[int, int]  # (h, w)
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def _writable_folder(train_data_dir: str | Path, output_dir: str | Path, sub: Path, what: str) -> Path:
    for root in (Path(train_data_dir) / CACHE_DIRNAME, Path(output_dir) / "cache"):
        folder = root / sub
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError(f"No writable place for the {what} cache under {train_data_dir} or {output_dir}.")


def cache_dir_for(train_data_dir: str | Path, output_dir: str | Path, vae_id: str) -> Path:
    """<data>/.lora_cache/latents/<vae id>, or under output_dir when the data folder is read-only."""
    return _writable_folder(train_data_dir, output_dir, Path("latents") / vae_id, "latent")


def cache_root_for(train_data_dir: str | Path, output_dir: str | Path, kind: str) -> Path:
    """<data>/.lora_cache/<kind> (e.g. "text"), or under output_dir when the data folder is read-only."""
    return _writable_folder(train_data_dir, output_dir, Path(kind), kind)


def _cache_name(content: str, bucket: Bucket, center_crop: bool, frames: tuple[int, ...] | None = None) -> str:
    # A video run's entries name their frames (a clip's window; "f1" an image as one frame).
    if frames is None:
        window = ""
    elif not frames:
        window = "_f1"
    else:
        window = f"_f{len(frames)}_" + hashlib.sha256(repr(frames).encode()).hexdigest()[:8]
    return f"{content}_{bucket[0]}x{bucket[1]}{window}{'' if center_crop else '_rc'}.safetensors"


def prepare_pixels(path: Path, bucket: Bucket, *, frames: tuple[int, ...] | None = None, center_crop: bool = True,
                   flip: bool = False, rng: Any = None) -> tuple[torch.Tensor, PreparedImage]:
    """An image's pixels [3, H, W] in [-1, 1]; in a video run (`frames` not None) [3, F, H, W]: a clip's
    frames (each resized and cropped alike), or an image as one frame."""
    import random

    if frames is None:
        prepared = prepare_image(load_rgb(path), bucket, center_crop=center_crop, flip=flip, rng=rng)
        return prepared.pixels, prepared
    from core.data.video_io import read_frames

    pictures = read_frames(path, frames) if frames else [load_rgb(path)]
    # One random crop for the whole clip: every frame takes the same corner (a center crop draws nothing: the
    # training RNG must not depend on whether latents came from the cache).
    seed = None if center_crop else (rng or random).random()
    prepared_all = [prepare_image(p, bucket, center_crop=center_crop, flip=flip, rng=random.Random(seed))
                    for p in pictures]
    return torch.stack([p.pixels for p in prepared_all], dim=1), prepared_all[0]


def _read_cached(path: Path) -> CachedImage | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["info"])
            moments = handle.get_tensor("moments").float()
    except Exception:  # noqa: BLE001 - a damaged cache file is simply encoded again
        return None
    return CachedImage(moments, tuple(meta["original_size"]), tuple(meta["crop_top_left"]),
                       tuple(meta["target_size"]))


def _write_cached(path: Path, item: CachedImage) -> None:
    from safetensors.torch import save_file

    info = json.dumps({"original_size": item.original_size, "crop_top_left": item.crop_top_left,
                       "target_size": item.target_size})
    with atomic_path(path) as tmp:
        save_file({"moments": item.moments.contiguous()}, str(tmp), metadata={"info": info})


@torch.no_grad()
def encode_moments(vae: Any, pixels: torch.Tensor,
                   moments_of: Callable[[Any, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """VAE mean+logvar [B, 2C, h, w] of pixels [B, 3, H, W] in [-1, 1] (run in the VAE's dtype).

    `moments_of(vae, pixels)`: the family's own encoder call (core.families.base.ImageFamily.encode_moments).
    """
    param = next(vae.parameters())
    pixels = pixels.to(param.device, param.dtype)
    moments = moments_of(vae, pixels) if moments_of is not None else vae.encode(pixels).latent_dist.parameters
    return moments.float().cpu()


def encode_images(vae: Any, paths: Sequence[Path], buckets: Sequence[Bucket], *, center_crop: bool,
                  cache_dir: Path | None, batch_size: int = 4,
                  progress: Callable[[int, int], None] | None = None,
                  moments_of: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
                  frames: Sequence[tuple[int, ...]] | None = None,
                  ) -> tuple[dict[int, CachedImage], list[tuple[str, str]], int]:
    """Latents for every image: {index: CachedImage}, images that failed to decode, cache hits.

    `frames`: a video run's frame windows per item (() for an image: one frame); the moments are then
    [2C, f, h, w] and the buckets (width, height, frame count)."""
    results: dict[int, CachedImage] = {}
    failed: list[tuple[str, str]] = []
    todo: dict[Bucket, list[tuple[int, Path, str]]] = {}
    hits = 0
    for index, (path, bucket) in enumerate(zip(paths, buckets)):
        try:
            content = file_hash(path)
        except OSError as exc:
            failed.append((path.name, f"cannot be read: {exc}"))
            continue
        if cache_dir is not None:
            cached = _read_cached(cache_dir / _cache_name(content, bucket, center_crop, _window(frames, index)))
            if cached is not None:
                results[index] = cached
                hits += 1
                continue
        todo.setdefault(tuple(bucket), []).append((index, path, content))
    total, done = len(paths), hits
    if progress:
        progress(done, total)
    for bucket, entries in todo.items():
        for start in range(0, len(entries), batch_size):
            chunk, prepared = [], []
            for index, path, content in entries[start:start + batch_size]:
                try:
                    prepared.append(prepare_pixels(path, bucket, frames=_window(frames, index),
                                                   center_crop=center_crop))
                    chunk.append((index, path, content))
                except (ImageReadError, OSError, ValueError) as exc:
                    failed.append((path.name, str(exc)))
            if prepared:
                moments = encode_moments(vae, torch.stack([pixels for pixels, _ in prepared]), moments_of)
                prepared = [p for _, p in prepared]
                for (index, _path, content), prep, moment in zip(chunk, prepared, moments):
                    item = CachedImage(moment.clone(), tuple(prep.original_size), tuple(prep.crop_top_left),
                                       tuple(prep.target_size))
                    results[index] = item
                    if cache_dir is not None:
                        _write_cached(cache_dir / _cache_name(content, bucket, center_crop, _window(frames, index)),
                                      item)
            done += len(entries[start:start + batch_size])
            if progress:
                progress(done, total)
    return results, failed, hits


def _window(frames: Sequence[tuple[int, ...]] | None, index: int) -> tuple[int, ...] | None:
    return None if frames is None else tuple(frames[index])


class TextCache:
    """Prompt embeddings per caption, computed once (text encoders frozen)."""

    def __init__(self) -> None:
        self.embeds: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def build(self, captions: Sequence[str], encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
              batch_size: int = 16) -> None:
        unique = sorted(set(captions) - set(self.embeds))
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            embeds, pooled = encode(chunk)
            for i, caption in enumerate(chunk):
                self.embeds[caption] = embeds[i].detach()
                if pooled is not None:
                    self.pooled[caption] = pooled[i].detach()

    def batch(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = torch.stack([self.embeds[c] for c in captions])
        pooled = torch.stack([self.pooled[c] for c in captions]) if self.pooled else None
        return embeds, pooled


def sample_latents(moments: torch.Tensor, scaling_factor: float, shift_factor: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents from cached VAE moments [B, 2C, h, w] (mean, logvar), like `latent_dist.sample()`."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def module_identity(module: torch.nn.Module) -> str:
    """A short fingerprint of a module's config and weights (keys the latent cache by VAE)."""
    digest = hashlib.sha256()
    config = getattr(module, "config", {})
    digest.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                             sort_keys=True, default=str).encode())
    params = list(module.state_dict().items())
    # First, last and a middle tensor: enough to tell two VAEs apart without hashing all 80 MB.
    for _, tensor in [params[0], params[len(params) // 2], params[-1]]:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
