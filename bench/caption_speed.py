#!/usr/bin/env python3
"""Images per second of batched captioning against one image at a time, in one process.

    .venv/bin/python bench/caption_speed.py [--images 32] [--batch-size 8] [--max-length 20] [--model DIR]
                                            [--threads N]

Without --model it builds the tests' tiny BLIP (random weights; greedy decoding gives the
same captions in both modes, checked and printed, so both do the same work). Both runs go through
`caption_folder`, image decoding and file writing included, over the same folder of
scikit-image photos; the baseline is `--batch-size 1`. Target: batched >= 2x.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.caption import CaptionOptions, caption_folder, load_captioner  # noqa: E402
from core.caption.tiny import build_mixed_photo_folder, build_tiny_blip  # noqa: E402


def make_folder(folder: Path, count: int) -> None:
    """`count` good photos: copies of the fixture's photos under new names."""
    source = folder.parent / "source"
    good = build_mixed_photo_folder(source)["good"]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        name = good[index % len(good)]
        shutil.copy(source / name, folder / f"{index:03d}_{Path(name).stem.replace(',', '')}{Path(name).suffix}")


def timed_run(folder: Path, captioner, batch_size: int, max_length: int) -> tuple[float, dict[str, str]]:
    for old in folder.glob("metadata.csv*"):
        old.unlink()
    options = CaptionOptions(input_dir=folder, model="(loaded)", batch_size=batch_size, max_length=max_length,
                             existing="overwrite")
    started = time.perf_counter()
    result = caption_folder(options, captioner=captioner)
    return time.perf_counter() - started, result.captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--model", default=None, help="a captioner (default: the tiny test BLIP)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or str(build_tiny_blip(work / "tiny-blip"))
        folder = work / "images"
        make_folder(folder, args.images)
        captioner = load_captioner(model, device=args.device)
        timed_run(folder, captioner, args.batch_size, 4)  # warm-up: first-call allocations, lazy imports
        single_s, single = timed_run(folder, captioner, 1, args.max_length)
        batched_s, batched = timed_run(folder, captioner, args.batch_size, args.max_length)
        captioner.close()
    same = sum(single[name] == batched.get(name) for name in single)
    import torch

    print(f"model: {args.model or 'tiny BLIP (random weights)'}; {args.images} images, "
          f"max {args.max_length} new tokens; {torch.get_num_threads()} torch threads")
    print(f"one at a time : {single_s:7.2f} s  {args.images / single_s:7.2f} images/s")
    print(f"batch of {args.batch_size:<5}: {batched_s:7.2f} s  {args.images / batched_s:7.2f} images/s")
    print(f"ratio batched / one-at-a-time: {single_s / batched_s:.2f}x (target >= 2x); "
          f"identical captions: {same}/{len(single)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
