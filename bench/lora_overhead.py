"""What a LoRA costs at generation: the base alone, the LoRA as PEFT layers, and fused into the weights.

The Test tab puts LoRAs on its cached pipeline with `core.lora_stack.applied` and takes them off
after each generate; this times exactly that, on the same pipeline and seed:

  base      the pipeline as loaded
  unfused   the LoRA(s) as PEFT layers (`set_adapters`): every LoRA layer adds x·A·B each step
  fused     the weighted deltas added into the base weights (`fuse_lora`), the base weights
            restored from a snapshot after (and what plain `unfuse_lora` would have left instead)

and reports s/it of each (steady: median step time of a run, the first step left out; the best of
`--rounds` runs, since other work on shared cores only ever adds time), the fixed cost of
putting the LoRA on and taking it off (loading the file, setting weights, snapshot + fusing;
restoring + unloading), and the extra latency of one image at 20 steps. It also checks
that the fused latents equal the unfused within tolerance and that the base weights after are the
ones before, bit for bit.

    python bench/lora_overhead.py                   # tiny SD, 64 px
    python bench/lora_overhead.py --full-unet       # SD 1.5-shaped pipeline, random weights, 256 px
    python bench/lora_overhead.py --loras 2         # two LoRAs at 0.8 and 0.5

The LoRA is random (rank 16 on the UNet's attention and feed-forward linears and the text
encoder's, PEFT-format keys): speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
WEIGHTS = (0.8, 0.5, 0.3)


def build_pipeline(full: bool, work: Path) -> Any:
    """A StableDiffusionPipeline with the Euler scheduler the Test tab uses (core.families.sd.family)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.families.sd.tiny import build_tiny_sd
    from core.families.tiny_parts import tiny_tokenizer

    torch.manual_seed(0)
    if full:
        from bench.image_speed import SD15_CLIP, SD15_UNET, SD15_VAE

        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).eval(),
            tokenizer=tiny_tokenizer(), unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             num_train_timesteps=1000, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        folder = build_tiny_sd(work, "sd1").folder
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(pipe: Any, path: Path, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA file (`unet.<layer>.lora_A.weight`, ...) for every targeted Linear."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, module, targets in (("unet", pipe.unet, UNET_TARGETS), ("text_encoder", pipe.text_encoder,
                                                                         TEXT_TARGETS)):
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.endswith(targets):
                down = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features ** 0.5
                up = torch.randn(layer.out_features, rank, generator=generator) * 0.02
                tensors[f"{prefix}.{name}.lora_A.weight"] = down
                tensors[f"{prefix}.{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def run(pipe: Any, steps: int, size: int) -> tuple[float, Any]:
    """(steady s/it, the final latents) of one image with CFG, from seed 0."""
    import torch

    stamps: list[float] = []

    def tick(_pipe: Any, _step: int, _t: Any, kwargs: dict) -> dict:
        stamps.append(time.perf_counter())
        return kwargs

    with torch.no_grad():
        latents = pipe(prompt="a photo of a cat", num_inference_steps=steps, guidance_scale=7.0, width=size,
                       height=size, generator=torch.Generator().manual_seed(0), output_type="latent",
                       callback_on_step_end=tick, return_dict=False)[0]
    diffs = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(diffs), latents


def base_state(pipe: Any) -> dict[str, Any]:
    return {f"{part}.{key}": value.clone() for part in ("unet", "text_encoder")
            for key, value in getattr(pipe, part).state_dict().items()}


def unfuse_drift(pipe: Any, loras: list[tuple[Path, float]], before: dict[str, Any]) -> dict[str, float]:
    """What plain `fuse_lora` + `unfuse_lora` (no snapshot) leave in the base weights: the share of weights
    no longer bit-equal, the largest change, and how long unfusing took (what restoring replaces)."""
    from core.lora_stack import components

    names = [f"drift_{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(components=components(pipe), adapter_names=names)
    started = time.perf_counter()
    pipe.unfuse_lora(components=components(pipe))
    seconds = time.perf_counter() - started
    changed = total = 0
    largest = 0.0
    for part in ("unet", "text_encoder"):
        for key, value in getattr(pipe, part).state_dict().items():
            if ".base_layer." not in key:
                continue
            old = before[f"{part}.{key.replace('.base_layer', '')}"]
            changed += int((value != old).sum())
            total += value.numel()
            largest = max(largest, float((value - old).abs().max()))
    pipe.unload_lora_weights()
    return {"changed_share": changed / max(total, 1), "max_abs": largest, "unfuse_s": seconds}


def measure(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from core.lora_stack import applied

    torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    pipe = build_pipeline(opts.full_unet, work)
    size = opts.size or (256 if opts.full_unet else 64)
    steps = opts.steps or (5 if opts.full_unet else 12)
    files = [random_lora(pipe, work / f"lora_{i}.safetensors", opts.rank, seed=i) for i in range(opts.loras)]
    loras = list(zip(files, WEIGHTS))
    print(f"built in {time.perf_counter() - started:.1f} s; {size} px, {steps} steps/run, {opts.loras} LoRA(s), "
          f"rank {opts.rank}, {opts.threads} thread(s)", flush=True)
    before = base_state(pipe)
    run(pipe, 2, size)  # warm-up: first-call allocations
    times: dict[str, list[float]] = {"base": [], "unfused": [], "fused": []}
    enter: dict[str, list[float]] = {"unfused": [], "fused": []}
    leave: dict[str, list[float]] = {"unfused": [], "fused": []}
    latents: dict[str, Any] = {}
    for _ in range(opts.rounds):
        per_it, latents["base"] = run(pipe, steps, size)
        times["base"].append(per_it)
        for mode in ("unfused", "fused"):
            t0 = time.perf_counter()
            with applied(pipe, loras, fuse=mode == "fused") as fused:
                t1 = time.perf_counter()
                assert fused == (mode == "fused")
                per_it, latents[mode] = run(pipe, steps, size)
                t2 = time.perf_counter()
            t3 = time.perf_counter()
            times[mode].append(per_it)
            enter[mode].append(t1 - t0)
            leave[mode].append(t3 - t2)
        print(json.dumps({k: round(v[-1], 4) for k, v in times.items()}), flush=True)
    after = {f"{part}.{key}": value for part in ("unet", "text_encoder")
             for key, value in getattr(pipe, part).state_dict().items()}  # no second copy of the model
    restored = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    _, latents["after"] = run(pipe, steps, size)
    drift = unfuse_drift(pipe, loras, before)
    del before, after
    scale = latents["unfused"].abs().max().item()
    result = {
        "size": size, "steps": steps, "loras": opts.loras, "rank": opts.rank,
        # The best round of each: on shared, busy cores the least disturbed figure is the truest one.
        "s_per_it": {k: min(v) for k, v in times.items()},
        "enter_s": {k: min(v) for k, v in enter.items()},
        "leave_s": {k: min(v) for k, v in leave.items()},
        "fused_vs_unfused_max_abs": (latents["fused"] - latents["unfused"]).abs().max().item(),
        "lora_vs_base_max_abs": (latents["unfused"] - latents["base"]).abs().max().item(),
        "latent_scale": scale,
        "base_weights_restored_bit_for_bit": restored,
        "base_image_after_equal": bool(torch.equal(latents["after"], latents["base"])),
        "plain_unfuse": drift,
    }
    base = result["s_per_it"]["base"]
    for mode in ("unfused", "fused"):
        fixed = result["enter_s"][mode] + result["leave_s"][mode]
        result[f"{mode}_ratio"] = result["s_per_it"][mode] / base
        result[f"{mode}_extra_ms_per_image_20_steps"] = 1000 * (fixed + 20 * (result["s_per_it"][mode] - base))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-unet", action="store_true", help="SD 1.5-shaped pipeline, random weights (slow).")
    parser.add_argument("--size", type=int, default=0, help="Image side in px (default 64 tiny, 256 full).")
    parser.add_argument("--steps", type=int, default=0, help="Steps per timed run (default 12 tiny, 5 full).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of base / unfused / fused; the best reported.")
    parser.add_argument("--loras", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    opts = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lora_overhead_") as tmp:
        result = measure(opts, Path(tmp))
    its = result["s_per_it"]
    print(f"\n{'SD 1.5-shaped' if opts.full_unet else 'tiny SD'}: {result['size']} px, CFG, {result['loras']} "
          f"LoRA(s) of rank {result['rank']}")
    print(f"  s/it        base {its['base']:.4f}   unfused {its['unfused']:.4f} ({result['unfused_ratio']:.3f}x)"
          f"   fused {its['fused']:.4f} ({result['fused_ratio']:.3f}x)")
    for mode in ("unfused", "fused"):
        print(f"  {mode:8s}    on {1000 * result['enter_s'][mode]:8.1f} ms   off {1000 * result['leave_s'][mode]:8.1f} ms"
              f"   extra per image at 20 steps {result[f'{mode}_extra_ms_per_image_20_steps']:8.1f} ms")
    print(f"  fused vs unfused latents: max |diff| {result['fused_vs_unfused_max_abs']:.2e} "
          f"(the LoRA itself moves them {result['lora_vs_base_max_abs']:.2e}; latents up to {result['latent_scale']:.2f})")
    print(f"  base weights restored bit for bit: {result['base_weights_restored_bit_for_bit']}; "
          f"base image after == before: {result['base_image_after_equal']}")
    drift = result["plain_unfuse"]
    print(f"  plain unfuse_lora instead: {100 * drift['changed_share']:.1f}% of the LoRA layers' base weights "
          f"not bit-equal after one cycle (max |diff| {drift['max_abs']:.1e}), unfusing took "
          f"{1000 * drift['unfuse_s']:.1f} ms")
    return result


if __name__ == "__main__":
    main()
