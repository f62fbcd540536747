"""What keeping freed memory (core/cpu_memory.py) does to a CPU training step, against glibc's defaults.

    python bench/cpu_allocator.py              # SD 1.5-shaped UNet, LoRA on attention, batch 4, 128 px
    python bench/cpu_allocator.py --rounds 3 --steps 6

Each round runs the same steps twice, each in a fresh process of its own: once with glibc's defaults
(what any PyTorch script gets) and once as our CPU runs do (one arena, no mmap, no trimming, in a
thread as the app runs a job); the order alternates between rounds. Printed per side: the median step,
minor page faults and kernel seconds per step, and the process's peak RSS; then the ratio of the
medians. The model is the SD 1.5-shaped one of bench/real_scripts.py (built once, random weights).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEP = r"""
import json, resource, statistics, sys, threading, time
sys.path.insert(0, sys.argv[3])
from core import cpu_memory
kept = sys.argv[1] == "kept"
if kept:
    cpu_memory.one_arena()
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(sys.argv[4]).requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
unet.train()
params = [p for p in unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
latents, text = torch.randn(4, 4, 16, 16), torch.randn(4, 77, 768)
rows = []

def own() -> tuple[int, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime

def steps() -> None:
    with cpu_memory.keeping_freed_memory(kept):
        for _ in range(int(sys.argv[2])):
            faults, kernel = own()
            started = time.perf_counter()
            pred = unet(latents, torch.randint(0, 1000, (4,)), text, return_dict=False)[0]
            torch.nn.functional.mse_loss(pred, latents).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - started
            after = own()
            rows.append((seconds, after[0] - faults, after[1] - kernel))

worker = threading.Thread(target=steps)  # as the app runs a job
worker.start()
worker.join()
rows = rows[1:]  # the first step warms oneDNN up on both sides
print(json.dumps({"s_per_step": statistics.median(r[0] for r in rows),
                  "faults_per_step": statistics.median(r[1] for r in rows),
                  "kernel_s_per_step": statistics.median(r[2] for r in rows),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def side(mode: str, steps: int, unet: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, mode, str(steps), str(ROOT), str(unet)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from bench.real_scripts import FAMILIES, prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    model, _, _ = prepare("sd15", FAMILIES["sd15"])
    results: dict[str, list[dict]] = {"default": [], "kept": []}
    for round_ in range(args.rounds):
        for mode in (("default", "kept") if round_ % 2 == 0 else ("kept", "default")):
            results[mode].append(side(mode, args.steps + 1, model / "unet"))
            print(mode, json.dumps({k: round(v, 3) for k, v in results[mode][-1].items()}), flush=True)
    median = {mode: statistics.median(r["s_per_step"] for r in rows) for mode, rows in results.items()}
    peak = {mode: max(r["peak_rss_gib"] for r in rows) for mode, rows in results.items()}
    print(f"kept freed memory: {median['default'] / median['kept']:.2f}x faster per step "
          f"({median['kept']:.2f} vs {median['default']:.2f} s), peak RSS {peak['kept']:.2f} vs "
          f"{peak['default']:.2f} GiB (SD 1.5-shaped UNet, batch 4, 128 px, 2 threads)")


if __name__ == "__main__":
    main()
