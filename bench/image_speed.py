"""Image LoRA training speed: this trainer vs a naive loop, as ratios, in one run.

The naive loop is what diffusers' `train_text_to_image_lora.py` does every step: decode
and resize the images, encode them with the VAE, tokenize and encode the captions, then
the UNet pass. Ours encodes each image and caption once (cached) and frees the VAE and
text encoder. Each side runs in its own process so peak memory (RSS; CUDA max allocated
on a GPU) is its own.

    python bench/image_speed.py                 # tiny SD model (overhead-bound), 30 steps
    python bench/image_speed.py --full-unet     # SD 1.5-shaped pipeline, random weights, 128 px,
                                                # batch 4, rank 4, fp32 (compute-bound)
    python bench/image_speed.py --full-unet --steps 30 --threads 2

Prints s/step (steady state, first steps left out), samples/s, whole-run seconds and peak
memory for both, and ours/naive ratios.

Measured on the shared 2-core CPU box (1 torch thread per side, load 5-10, noisy):
  tiny SD, 30 steps:          steady 1.9-2.7x samples/s, whole run 0.85-1.4x (imports dominate), same RSS
  SD 1.5-shaped, 6 steps:     22.5 vs 43.4 s/step (1.93x), whole run 255 vs 437 s (1.71x),
                              peak RSS 4.63 vs 5.09 GiB
Idle machine, --full-unet --steps 30 --threads 2 (the DESIGN.md target case):
  ours 5.02 s/step, whole run 177 s, 4.59 GiB; naive 8.24 s/step, 258 s, 5.08 GiB
  -> 1.64x per step, 1.46x whole run, 0.90x memory
  channels_last on the SD 1.5 UNet (fwd+bwd, alternating A/B): 21.3 vs 23.4 s median, within noise.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.side_by_side import measure as in_child  # noqa: E402  (each side, and the build, in a child)
from bench.side_by_side import whole_run  # noqa: E402  (whole_run_s from process start, both sides)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Published configs of SD 1.5 (runwayml/stable-diffusion-v1-5: unet, vae, text_encoder).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                in_channels=3, out_channels=3, sample_size=512, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=768)


def build_full_sd15(folder: Path) -> Path:
    """An SD 1.5-shaped diffusers folder with random weights (speed does not depend on weights)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.families.tiny_parts import tiny_tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).eval(),
        tokenizer=tiny_tokenizer(), unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def peak_memory() -> dict[str, float]:
    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def steady(times: list[float], skip: int) -> float:
    diffs = [b - a for a, b in zip(times, times[1:])][skip:]
    return statistics.median(diffs) if diffs else float("nan")


def run_ours(args: dict) -> dict:
    start = time.perf_counter()  # both sides count their imports: a real run pays them too
    import torch

    torch.set_num_threads(args["threads"])
    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training

    stamps: list[float] = []
    ctx = RunContext(listeners=[lambda e: stamps.append(time.perf_counter()) if e.kind == "progress" else None])
    cfg = config_from_dict(dict(
        base_model=args["model"], train_data_dir=args["data"], output_dir=args["out"], resolution=args["res"],
        batch_size=args["batch"], max_train_steps=args["steps"], save_steps=0, lora_rank=4, lora_alpha=4,
        learning_rate=1e-4, mixed_precision="no", bucketing=False, cache_latents_to_disk=False,
        gradient_checkpointing=False, seed=1))
    run_training(cfg, ctx)
    total = time.perf_counter() - start
    return {"s_per_step": steady(stamps, args["skip"]), "whole_run_s": total,
            "first_step_at_s": stamps[0] - start if stamps else float("nan"), **peak_memory()}


def run_naive(args: dict) -> dict:
    """The diffusers example's loop: everything re-encoded every step."""
    start = time.perf_counter()
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(args["threads"])
    model, res = args["model"], args["res"]
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rows = [line.split(",", 1) for line in (Path(args["data"]) / "metadata.csv").read_text().splitlines()[1:]]
    rng = random.Random(1)
    torch.manual_seed(1)

    def load(name: str) -> torch.Tensor:  # Resize(res) + CenterCrop(res) + Normalize([0.5], [0.5])
        image = Image.open(Path(args["data"]) / name).convert("RGB")
        scale = res / min(image.size)
        image = image.resize((max(res, round(image.width * scale)), max(res, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
        left, top = (image.width - res) // 2, (image.height - res) // 2
        array = np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(array).permute(2, 0, 1)

    stamps = []
    unet.train()
    for _ in range(args["steps"]):
        batch = rng.sample(rows, min(args["batch"], len(rows)))
        pixels = torch.stack([load(name) for name, _ in batch])
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer([c for _, c in batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids, return_dict=False)[0]
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    total = time.perf_counter() - start
    return {"s_per_step": steady(stamps, args["skip"]), "whole_run_s": total,
            "first_step_at_s": stamps[0] - start, **peak_memory()}


def _child(kind: str, args: dict, queue: mp.Queue) -> None:
    import logging

    logging.disable(logging.WARNING)
    queue.put((run_ours if kind == "ours" else run_naive)(args))


def _build_child(folder: str, queue: Any) -> None:
    build_full_sd15(Path(folder))
    queue.put(folder)


def measure(kind: str, args: dict) -> dict:
    return whole_run(_child, kind, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-unet", action="store_true", help="SD 1.5-shaped model at 128 px (slow).")
    parser.add_argument("--steps", type=int, default=0, help="Training steps per side (default 30 tiny, 8 full).")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                        help="torch threads per side (1 is fastest on shared, busy cores).")
    parser.add_argument("--keep", default="", help="Folder to keep the built model in (reused when present).")
    opts = parser.parse_args()
    from core.families.sd.tiny import build_tiny_sd
    from core.families.tiny_parts import make_image_folder

    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="image_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    if opts.full_unet:
        model = work / "sd15-random"
        if not (model / "model_index.json").is_file():
            print("building an SD 1.5-shaped pipeline with random weights ...", flush=True)
            in_child(_build_child, str(model))  # in a child: its peak is not the sides' floor
        res, batch, steps = 128, 4, opts.steps or 8
    else:
        model = build_tiny_sd(work, "sd1").folder
        res, batch, steps = 64, 4, opts.steps or 30
    data = make_image_folder(work / "images", count=opts.images, size=(256, 256))
    args = dict(model=str(model), data=str(data), res=res, batch=batch, steps=steps, threads=opts.threads,
                skip=2 if steps > 4 else 0)
    results = {}
    for kind in ("naive", "ours"):
        results[kind] = measure(kind, dict(args, out=str(work / f"out_{kind}")))
        print(kind, json.dumps({k: round(v, 3) for k, v in results[kind].items()}), flush=True)
    ours, naive = results["ours"], results["naive"]
    print(f"\n{'full SD 1.5-shaped UNet' if opts.full_unet else 'tiny SD'}: {res} px, batch {batch}, {steps} steps, "
          f"{opts.images} images, {opts.threads} thread(s)")
    for key, label in (("s_per_step", "s/step (steady)"), ("whole_run_s", "whole run s"),
                       ("peak_rss_gib", "peak RSS GiB")):
        print(f"  {label:18s} ours {ours[key]:8.3f}   naive {naive[key]:8.3f}")
    print(f"  samples/s          ours {batch / ours['s_per_step']:8.2f}   naive {batch / naive['s_per_step']:8.2f}")
    print(f"  speed-up (steady samples/s): {naive['s_per_step'] / ours['s_per_step']:.2f}x")
    print(f"  speed-up (whole run):        {naive['whole_run_s'] / ours['whole_run_s']:.2f}x")
    print(f"  memory ratio (ours/naive):   {ours['peak_rss_gib'] / naive['peak_rss_gib']:.2f}")
    if not opts.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
