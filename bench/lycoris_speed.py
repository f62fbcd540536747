#!/usr/bin/env python3
"""s/step and file size of LoKr and LoHa against LoRA, in one process: an SD 1.5-shaped UNet and a
FLUX-width transformer, each at tiny depth.

    .venv/bin/python bench/lycoris_speed.py [--steps 1] [--rank 16] [--factor 8] [--cases sd15,flux]
                                            [--flux-width 3072] [--threads 0]

Each case builds the real widths with few layers: SD 1.5's first two levels (320 and 640 channels,
8-head attention, CLIP-L's 768-wide cross-attention, one layer per block, a 16x16 latent: the 1280
levels would make a CPU step a minute long), and FLUX.1's 3072-wide blocks (24 heads of 128, joint
4096, pooled 768), one double and one single, 64 image and 32 text tokens. The model is built once;
each variant gets its own copy of the same weights with the trainer's own adapter injected
(core.families.sd.lora.add_unet_lora; the transformer families' shared default add_lora), and the
variants' training steps (forward, MSE backward, AdamW on the adapter) are interleaved round by round,
so a machine whose load changes slows all three alike. s/step is the median after one warm-up round;
the file size is the adapter's PEFT tensors written at fp16 (the default save_precision) to a
.safetensors file (the real file adds alpha scalars and metadata, a few KB). Ratios are against LoRA.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("lora", "lokr", "loha")


def sd15_case() -> tuple[Any, Callable[[Any, Any], None], dict[str, Any]]:
    """(UNet at SD 1.5's first two levels, how the trainer adds its adapter, one batch)."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.lycoris_sizes import SD15
    from core.families.sd.lora import add_unet_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD15, "block_out_channels": (320, 640), "layers_per_block": 1,
                                   "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                                   "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")})
    unet.requires_grad_(False)
    batch = dict(sample=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500]),
                 encoder_hidden_states=torch.randn(1, 77, 768))
    return unet, add_unet_lora, batch


def flux_case(width: int = 3072) -> tuple[Any, Callable[[Any, Any], None], dict[str, Any]]:
    """(FLUX.1-dev's block widths, one double and one single block; how the trainer adds its adapter; a batch)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from core.family_api.lookup import family_impl

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=128, num_attention_heads=width // 128,
                                         joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                         axes_dims_rope=[16, 56, 56])

    def add(model: Any, cfg: Any) -> None:
        family_impl("flux-dev").add_lora(SimpleNamespace(transformer=model, variant="flux-dev"), cfg, None,
                                         lambda _: None)

    image, text = 64, 32
    batch = dict(hidden_states=torch.randn(1, image, 64), encoder_hidden_states=torch.randn(1, text, 4096),
                 pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]),
                 img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]),
                 return_dict=False)
    return transformer, add, batch


def train_step(model: Any, optimizer: Any, batch: dict[str, Any]) -> float:
    """Seconds of one training step: forward, MSE backward, AdamW on the adapter."""
    started = time.perf_counter()
    out = model(**batch)
    out = out[0] if isinstance(out, (tuple, list)) else out.sample
    out.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def measure(models: dict[str, Any], batch: dict[str, Any], steps: int) -> dict[str, float]:
    """Median s/step of each model, their steps interleaved round by round, after one warm-up round."""
    import torch

    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps + 1):
        for name, model in models.items():
            times[name].append(train_step(model, optimizers[name], batch))
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def file_megabytes(model: Any, folder: Path, name: str) -> float:
    from safetensors.torch import save_file

    from core.lora import peft_state

    path = folder / f"{name}.safetensors"
    save_file({k: v.half().contiguous() for k, v in peft_state(model).items()}, str(path))
    return os.path.getsize(path) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--factor", type=int, default=8, help="lokr_factor (-1: near the square root)")
    parser.add_argument("--cases", default="sd15,flux")
    parser.add_argument("--flux-width", type=int, default=3072)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    from core.config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    builders = {"sd15": sd15_case, "flux": lambda: flux_case(args.flux_width)}
    print(f"rank {args.rank}, lokr_factor {args.factor}, {args.steps} timed steps, {torch.get_num_threads()} "
          f"threads, device cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            base, add, batch = builders[case]()
            models = {}
            for variant in VARIANTS:
                cfg = dataclasses.replace(TrainConfig(), lora_variant=variant, lora_rank=args.rank,
                                          lora_alpha=args.rank, lokr_factor=args.factor)
                models[variant] = copy.deepcopy(base)
                add(models[variant], cfg)
            del base
            seconds = measure(models, batch, args.steps)
            rows = {v: (seconds[v], file_megabytes(models[v], Path(tmp), f"{case}-{v}")) for v in VARIANTS}
            del models
            base_s, base_mb = rows["lora"]
            print(f"\n{case:<6} {'variant':<8} {'s/step':>8} {'x lora':>7} {'file MB':>9} {'x lora':>7}")
            for variant, (seconds, megabytes) in rows.items():
                print(f"{'':<6} {variant:<8} {seconds:>8.3f} {seconds / base_s:>7.2f} {megabytes:>9.2f} "
                      f"{megabytes / base_mb:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
