"""Z-Image LoRA training speed and memory: this trainer vs the diffusers example's loop, in one run.

The peer is diffusers' `examples/dreambooth/train_dreambooth_lora_z_image.py`, replayed here with the
same libraries (not its code; it imports torchvision, which does not import beside the torch this
project pins): with per-image captions it encodes every caption once before training (its
step-indexed prompt cache, Qwen3 then freed), and each step reads and crops the images, encodes
them with the VAE (no `--cache_latents`), draws timesteps uniformly (`weighting_scheme none`),
runs the transformer on the list inputs with time `(1000 - t) / 1000`, negates its output, and
steps AdamW. Ours is `train.py`'s own path (latents and Qwen3 outputs cached once). The LoRA goes
on the same modules on both sides (attention + MLP of every block: `zimage.lora_targets`), at the
same rank, resolution, batch and number of steps; each side runs in its own process.

The model: a transformer at Z-Image's real width (3840, 30 heads, caption width 2560) with few
blocks (`--layers` main layers, one noise and one context refiner), random weights; FLUX's AE
config; a Qwen3 at Qwen3-4B's width with `--qwen-layers` of its 36 layers (vocabulary of the tiny
test tokenizer).

    python bench/zimage_speed.py                       # 2 main layers, 256 px, 6 steps
    python bench/zimage_speed.py --toy                 # tiny widths: checks that both sides run

Prints s/step (steady state), the whole run and the peak memory of both sides, and ours/peer ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.flux_speed import FLUX_AE  # noqa: E402
from bench.side_by_side import add_side_args, compare, steady  # noqa: E402
from bench.image_speed import peak_memory  # noqa: E402

ZIMAGE = dict(dim=3840, n_heads=30, n_kv_heads=30, cap_feat_dim=2560, n_refiner_layers=1)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960)
TOY = dict(transformer=dict(dim=32, n_heads=2, n_kv_heads=2, cap_feat_dim=16, n_refiner_layers=1,
                            axes_dims=[8, 4, 4], axes_lens=[256, 128, 128]),
           qwen=dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=512))


def build_model(folder: Path, *, layers: int, qwen_layers: int, toy: bool) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from core.families.tiny_parts import chat_bpe_tokenizer as build_tokenizer
    from core.families.zimage.tiny import tiny_zimage_vae

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    transformer = ZImageTransformer2DModel(n_layers=layers, **(TOY["transformer"] if toy else ZIMAGE))
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    qwen = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), num_hidden_layers=qwen_layers,
                                  **(TOY["qwen"] if toy else QWEN3_4B)))
    vae = tiny_zimage_vae() if toy else AutoencoderKL(**FLUX_AE)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=qwen.eval(),
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def run_ours(model: str, data: str, args: argparse.Namespace, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training

    stamps: list[float] = []
    cfg = config_from_dict(dict(
        base_model=model, train_data_dir=data, output_dir=tempfile.mkdtemp(prefix="zimage-ours-"),
        resolution=args.resolution, batch_size=args.batch, max_train_steps=args.steps, learning_rate=1e-4,
        lora_rank=args.rank, lora_alpha=args.rank, mixed_precision="no", seed=0, save_steps=0, save_precision="fp32",
        min_bucket_reso=args.resolution, max_bucket_reso=args.resolution, cache_latents_to_disk=False,
        timestep_sampling="uniform"))
    ctx = RunContext(listeners=[lambda e: stamps.append(time.perf_counter()) if e.kind == "progress" else None])
    run_training(cfg, ctx)
    total = time.perf_counter() - started
    queue.put({"s_per_step": steady([b - a for a, b in zip(stamps, stamps[1:])]), "whole_run_s": total,
               **peak_memory()})


def run_peer(model: str, data: str, args: argparse.Namespace, queue) -> None:
    import gc

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    from core.data.captions import read_metadata_csv
    from core.families.zimage.load import lora_targets

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    images = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    captions = read_metadata_csv(Path(data) / "metadata.csv").captions
    batches = [[images[(s * args.batch + i) % len(images)] for i in range(args.batch)] for s in range(args.steps)]
    # Its step-indexed prompt cache: every batch's captions encoded before training, then Qwen3 goes.
    text_pipe = ZImagePipeline(scheduler=None, vae=None, transformer=None,
                               text_encoder=AutoModel.from_pretrained(model, subfolder="text_encoder"),
                               tokenizer=AutoTokenizer.from_pretrained(model, subfolder="tokenizer"))
    with torch.no_grad():
        prompt_cache = [text_pipe.encode_prompt([captions.get(p.name, "") for p in batch],
                                                do_classifier_free_guidance=False)[0] for batch in batches]
    del text_pipe
    gc.collect()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    transformer = ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    for module in (vae, transformer):
        module.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=lora_targets(transformer)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    stamps = []
    for step, batch in enumerate(batches):
        pixels = []
        for path in batch:
            image = Image.open(path).convert("RGB")
            side = min(image.size)
            image = image.crop(((image.width - side) // 2, (image.height - side) // 2,
                                (image.width + side) // 2, (image.height + side) // 2))
            image = image.resize((args.resolution, args.resolution), Image.BILINEAR)
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        with torch.no_grad():
            latents = vae.encode(torch.stack(pixels)).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=latents.shape[0])
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, prompt_cache[step],
                          return_dict=False)[0]
        pred = -torch.stack(out).squeeze(2)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    total = time.perf_counter() - started
    queue.put({"s_per_step": steady([b - a for a, b in zip(stamps, stamps[1:])]), "whole_run_s": total,
               **peak_memory()})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="main transformer layers (Z-Image has 30)")
    parser.add_argument("--qwen-layers", type=int, default=2, help="Qwen3-4B layers kept (of 36)")
    add_side_args(parser)
    args = parser.parse_args(argv)
    return compare(args, build_model, dict(layers=args.layers, qwen_layers=args.qwen_layers, toy=args.toy),
                   run_ours, run_peer, prefix="zimage-bench-",
                   shape=f"{args.layers} main layers + 2 refiners at width {32 if args.toy else 3840}")


if __name__ == "__main__":
    main()
