#!/usr/bin/env python3
"""How fast the trainer's folder scan is against decoding every image, in one process.

    .venv/bin/python bench/image_scan.py [--images 200] [--side 1024]

Builds a folder of photo-sized JPEGs and PNGs (scikit-image's sample photos, resized) with a
metadata.csv, then times, best of 3: the baseline (open and fully decode every image to RGB,
what a naive scan does) against `scan_image_dataset` (headers and file tails only) and the
Dataset tab's `health_check` (decodes small for hashes). Prints seconds and ratios.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from core.config import TrainConfig  # noqa: E402
from core.data.health import health_check  # noqa: E402
from core.data.image_io import load_rgb  # noqa: E402
from core.data.images import find_image_files, scan_image_dataset  # noqa: E402
from core.caption.tiny import skimage_data_dir  # noqa: E402

SOURCES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")


def build(folder: Path, count: int, side: int) -> None:
    rows = ["filename,prompt"]
    for i in range(count):
        with Image.open(skimage_data_dir() / SOURCES[i % len(SOURCES)]) as source:
            image = source.convert("RGB")
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        name = f"img_{i:04d}." + ("jpg" if i % 2 else "png")
        image.save(folder / name, quality=90)
        rows.append(f"{name},photo number {i}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def best_of(runs: int, work) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.images, args.side)
        cfg = TrainConfig(train_data_dir=str(folder))

        def decode_all() -> None:
            for path in find_image_files(folder)[0]:
                load_rgb(path)

        baseline = best_of(3, decode_all)
        scan = best_of(3, lambda: scan_image_dataset(cfg))
        health = best_of(3, lambda: health_check(folder))
        print(f"{args.images} images, {args.side} px long side (half JPEG, half PNG)")
        print(f"baseline: decode every image   {baseline:7.3f} s")
        print(f"scan_image_dataset             {scan:7.3f} s   {baseline / scan:6.1f}x faster than the baseline")
        print(f"health_check (dHash, decodes)  {health:7.3f} s   {baseline / health:6.1f}x the baseline's speed")


if __name__ == "__main__":
    main()
