#!/usr/bin/env python3
"""Training speed and peak memory of each LoRA variant relative to plain LoRA, in one run.

    .venv/bin/python bench/variants.py [--steps 30] [--resolution 64] [--variants lora,dora,...] [--model DIR]

Every variant trains the same tiny SD 1.x model (the tests' builder; --model takes a diffusers
folder or a single file instead) on the same images with the real trainer (`core.train`), each
in its own child process so its peak memory is its own: RSS high-water mark (VmHWM) on the CPU,
`torch.cuda.max_memory_allocated` on a GPU. s/it is the median over the steps after the first
quarter (warm-up excluded). Ratios are against `lora` measured in the same run.

Variants: lora, rslora, dora, pissa (PEFT's SVD init; no conv layers, PEFT has no conv PiSSA),
locon (lora + conv_rank 4), loraplus (lora + loraplus_lr_ratio 16), lokr (lokr_factor 4), loha.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "lora": {},
    "rslora": {"lora_variant": "rslora"},
    "dora": {"lora_variant": "dora"},
    "pissa": {"lora_variant": "pissa"},
    "locon": {"conv_rank": 4, "conv_alpha": 4},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    "lokr": {"lora_variant": "lokr", "lokr_factor": 4},
    "loha": {"lora_variant": "loha"},
}


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """Train one variant and print one JSON line with its numbers."""
    import torch

    from core.config import config_from_dict
    from core.events import ProgressEvent, RunContext
    from core.train import run_training

    values = {"task_type": "image-generation", "base_model": args.model, "train_data_dir": args.data,
              "output_dir": str(Path(args.out) / args.child), "resolution": args.resolution, "batch_size": 2,
              "max_train_steps": args.steps, "lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-4,
              "mixed_precision": "no", "save_steps": 10_000, "sample_steps": 0, "seed": 0,
              **VARIANTS[args.child]}
    cfg = config_from_dict(values)
    times: list[float] = []
    stamps: list[float] = []

    def listen(event) -> None:
        if isinstance(event, ProgressEvent) and event.total:
            stamps.append(time.perf_counter())

    ctx = RunContext(listeners=[listen])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run_training(cfg, ctx)
    total = time.perf_counter() - started
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = times[len(times) // 4:] or times
    result = {"variant": args.child, "s_per_it": statistics.median(steady) if steady else float("nan"),
              "steps": len(stamps), "run_s": total, "peak_rss_mb": _peak_rss_mb()}
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--model", default="", help="SD model (default: the tests' tiny SD 1.x, built here)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from core.families.sd.tiny import build_tiny_sd
    from core.families.tiny_parts import make_image_folder

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"Unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}.")
    if "lora" not in names:
        names.insert(0, "lora")  # the baseline
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or str(build_tiny_sd(root, "sd1").folder)
        data = make_image_folder(root / "images", count=8)
        results = {}
        for name in names:
            command = [sys.executable, __file__, "--child", name, "--model", model, "--data", str(data),
                       "--out", str(root / "runs"), "--steps", str(args.steps), "--resolution", str(args.resolution)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            results[name] = json.loads(line[len("RESULT "):])
            print(f"{name}: {results[name]}", flush=True)
    base = results.get("lora")
    if not base:
        raise SystemExit("The plain LoRA baseline failed; no ratios.")
    memory_key = "peak_cuda_mb" if "peak_cuda_mb" in base else "peak_rss_mb"
    print(f"\n{'variant':<10} {'s/it':>8} {'x lora':>7} {memory_key:>13} {'x lora':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['s_per_it']:>8.3f} {r['s_per_it'] / base['s_per_it']:>7.2f} "
              f"{r[memory_key]:>13.0f} {r[memory_key] / base[memory_key]:>7.2f}")


if __name__ == "__main__":
    main()
