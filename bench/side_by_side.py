"""What the family benchmarks share (flux_speed, sd3_speed, qwen_speed, zimage_speed): their common
command-line options, each side in a process of its own, and the ratios printed at the end.

Linux keeps a process's peak RSS across fork + exec, so a side spawned by the process that built
the model would start at the builder's peak: the model is built in a child too.

`whole_run_s` is the same thing for both sides: from the moment the side's process is started to the
moment its result comes back (interpreter start, imports, loading, caching, the steps, saving), timed
by the parent. A side's own clock would start wherever its code put it (after some imports or before).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def make_images(folder: Path, count: int, size: int) -> Path:
    from core.families.tiny_parts import make_image_folder

    return make_image_folder(folder, count=count, size=(size, size))


def steady(times: list[float]) -> float:
    """Seconds per step once warm: the median without the first step."""
    return statistics.median(times[1:] if len(times) > 2 else times)


def measure(target: Callable[..., None], *call_args: Any) -> Any:
    """`target(*call_args, queue)` in a spawned process; what it put in the queue."""
    return timed(target, *call_args)[0]


def timed(target: Callable[..., None], *call_args: Any) -> tuple[Any, float]:
    """`measure`, and the seconds from the process's start to its result: a whole run as a user sees it."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*call_args, queue))
    started = time.perf_counter()
    process.start()
    result = queue.get()
    elapsed = time.perf_counter() - started
    process.join()
    return result, elapsed


def whole_run(target: Callable[..., None], *call_args: Any) -> dict:
    """A side's figures with `whole_run_s` from its process's start (the side's own clock kept as
    `in_process_s`)."""
    result, elapsed = timed(target, *call_args)
    return {**result, "in_process_s": result.get("whole_run_s", float("nan")), "whole_run_s": elapsed}


def _build(build_model: Callable[..., Path], folder: Path, kwargs: dict, queue: Any) -> None:
    queue.put(str(build_model(folder, **kwargs)))


def add_side_args(parser: argparse.ArgumentParser) -> None:
    """The options every side-by-side benchmark has (the family's own come before)."""
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--toy", action="store_true", help="tiny widths: a quick check that both sides run")
    parser.add_argument("--only", choices=("ours", "peer"), help="run one side")


def compare(args: argparse.Namespace, build_model: Callable[..., Path], build_kwargs: dict,
            run_ours: Callable[..., None], run_peer: Callable[..., None], *, prefix: str,
            shape: str) -> dict:
    """Build the model (in a child), run ours and the peer (each in a child), print and return both
    sides' figures and, when both ran, the ratios; `shape` says what was measured."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    model = measure(_build, build_model, work / "model", build_kwargs)
    data = str(make_images(work / "data", args.images, max(args.resolution, 64)))
    results: dict = {}
    for name, target in (("ours", run_ours), ("peer", run_peer)):
        if args.only in (None, name):
            results[name] = whole_run(target, model, data, args)
            print(f"{name}: {json.dumps({k: round(v, 3) for k, v in results[name].items()})}", flush=True)
    if len(results) == 2:
        ours, peer = results["ours"], results["peer"]
        ratios = {"speed_per_step": peer["s_per_step"] / ours["s_per_step"],
                  "speed_whole_run": peer["whole_run_s"] / ours["whole_run_s"],
                  "memory": ours["peak_rss_gib"] / peer["peak_rss_gib"]}
        results["ratios"] = ratios
        print(f"ours vs the diffusers example's loop: {ratios['speed_per_step']:.2f}x per step, "
              f"{ratios['speed_whole_run']:.2f}x whole run, {ratios['memory']:.2f}x peak memory "
              f"({shape}, {args.resolution} px, batch {args.batch}, rank {args.rank}, {args.steps} steps, "
              f"{args.threads} threads)")
    return results
