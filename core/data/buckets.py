"""Aspect-ratio buckets: wide and tall images keep their shape instead of a square crop.

`make_buckets` lists the (width, height) shapes of about the training area, `choose_bucket`
picks the one closest in aspect ratio for an image, `prepare_image` resizes an image to
cover its bucket and crops the rest (recording SDXL's size/crop conditioning), and
`BucketBatchSampler` makes batches from one bucket at a time, in an order fixed by the
seed and the epoch so a resumed run sees the same batches.
"""
from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.config import TrainConfig

Bucket = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 2048, step: int = 64) -> list[Bucket]:
    """(width, height) shapes, multiples of `step`, area <= resolution**2, sides in [min_reso, max_reso].

    For each width the tallest height that keeps the area is taken (the most pixels for that
    shape), plus its transpose. The square (resolution, resolution) is always there, even when
    `resolution` is outside [min_reso, max_reso]. A `min_reso` that leaves no room for any
    shape but the square (at or above the resolution, e.g. the default 256 at resolution 128)
    is lowered to half the resolution: otherwise bucketing would silently do nothing.
    Sorted from the tallest to the widest.
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution ({resolution}) and step ({step}) must be positive.")
    area = resolution * resolution
    found: set[Bucket] = {(resolution, resolution)}
    low = math.ceil(min_reso / step) * step
    if low >= resolution:
        low = math.ceil(resolution // 2 / step) * step
    for width in range(max(step, low), max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= max(low, step) and width * height <= area:
            found.add((width, height))
            found.add((height, width))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def choose_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket closest to the image's aspect ratio (in log space); ties go to the larger area."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def bucket_for(width: int, height: int, cfg: TrainConfig) -> Bucket:
    """The training shape of one image under `cfg`: its bucket, or the square when bucketing is off."""
    if not cfg.bucketing:
        return (cfg.resolution, cfg.resolution)
    return choose_bucket(width, height, make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso))


def bucket_label(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def bucket_info(sizes: Sequence[tuple[int, int]], buckets: Sequence[Bucket]) -> dict:
    """kohya's `ss_bucket_info`: {"buckets": {"0": {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}.

    `sizes` are the images' (width, height), `buckets` the bucket each one was given.
    """
    counts: dict[Bucket, int] = {}
    errors = []
    for (width, height), bucket in zip(sizes, buckets):
        counts[bucket] = counts.get(bucket, 0) + 1
        errors.append(abs(width / height - bucket[0] / bucket[1]))
    ordered = sorted(counts, key=lambda b: (b[0] / b[1], b))
    return {"buckets": {str(i): {"resolution": list(b), "count": counts[b]} for i, b in enumerate(ordered)},
            "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}


# --- one image ---------------------------------------------------------------------------

@dataclass
class PreparedImage:
    pixels: torch.Tensor  # float32 [3, H, W] in [-1, 1]
    original_size: tuple[int, int]  # (h, w) before resizing, for SDXL's size conditioning
    crop_top_left: tuple[int, int]  # (top, left) in the resized image, for SDXL
    target_size: tuple[int, int]  # (h, w) == bucket


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The (width, height) an image is resized to so that it covers `bucket` keeping its shape."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))


def prepare_image(image: Image.Image, bucket: Bucket, *, center_crop: bool = True, flip: bool = False,
                  rng: random.Random | None = None) -> PreparedImage:
    """Resize (Lanczos) to cover `bucket`, crop to it (center or random), flip if asked.

    The crop corner is reported in the coordinates of the resized (and, when flipped,
    mirrored) image, as diffusers' SDXL training does.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    new_w, new_h = cover_size(width, height, bucket)
    if (new_w, new_h) != (width, height):
        # Lanczos filters over the whole footprint when shrinking (antialiased); reducing_gap
        # first box-reduces huge photos by an integer factor, which is much faster and looks the same.
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    spare_w, spare_h = new_w - bucket[0], new_h - bucket[1]
    if center_crop:
        left, top = spare_w // 2, spare_h // 2
    else:
        chooser = rng or random
        left, top = chooser.randint(0, spare_w), chooser.randint(0, spare_h)
    if spare_w or spare_h:
        image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = spare_w - left
    array = np.asarray(image, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return PreparedImage(pixels=pixels.contiguous(), original_size=(height, width),
                         crop_top_left=(top, left), target_size=(bucket[1], bucket[0]))


# --- batches -----------------------------------------------------------------------------

def _fill_batches(indices: list[int], size: int) -> list[list[int]]:
    """Cut `indices` into batches of `size` in order, moving a repeated index to a later batch.

    With `repeats`, the end of one pass and the start of the next can put the same image
    twice in a batch; such an index waits for the next batch, but only while the rest of the
    pool can still fill this one: every batch but the last stays full, so there are always
    ceil(len / size) batches, and a bucket of one repeated image still makes full batches.
    """
    pool = deque(indices)
    batches: list[list[int]] = []
    while pool:
        batch: list[int] = []
        waiting: list[int] = []
        while pool and len(batch) < size:
            index = pool.popleft()
            if index in batch and len(pool) >= size - len(batch) and len(waiting) < 4 * size:
                waiting.append(index)
            else:
                batch.append(index)
        pool.extendleft(reversed(waiting))
        batches.append(batch)
    return batches


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices, every batch from one bucket.

    `buckets[i]` is the bucket of dataset item i. Each epoch's order depends only on
    (seed, epoch): `batches_for_epoch(epoch)` gives it without iterating, so a resumed run
    can skip the batches it already trained (`set_epoch(epoch, skip=k)`). Partial batches
    are kept: no image is ever dropped. `repeats` puts each index in the epoch that many times.
    """

    def __init__(self, buckets: Sequence[Bucket], batch_size: int, seed: int, repeats: int = 1,
                 shuffle: bool = True) -> None:
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"batch_size ({batch_size}) and repeats ({repeats}) must be at least 1.")
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0
        self._groups: dict[tuple, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            self._groups.setdefault(bucket, []).append(index)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch the next iteration yields; `skip` leaves out its first batches (resume)."""
        self.epoch = epoch
        self.skip = max(0, skip)

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"bucket-sampler/{self.seed}/{epoch}")
        batches: list[list[int]] = []
        for bucket in sorted(self._groups):
            indices: list[int] = []
            for _ in range(self.repeats):
                # Shuffle each repeat on its own so copies of an image rarely share a batch.
                chunk = list(self._groups[bucket])
                if self.shuffle:
                    rng.shuffle(chunk)
                indices.extend(chunk)
            batches.extend(_fill_batches(indices, self.batch_size))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches_for_epoch(self.epoch)[self.skip:]

    def __len__(self) -> int:
        total = sum(math.ceil(len(group) * self.repeats / self.batch_size) for group in self._groups.values())
        return max(0, total - self.skip)
