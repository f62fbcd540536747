"""Qwen-Image LoRA training speed and memory: this trainer vs the diffusers example's loop, in one run.

The peer is diffusers' `examples/dreambooth/train_dreambooth_lora_qwen_image.py`. Like the FLUX
example it imports torchvision, which does not import beside the torch this project pins, so its
per-step work is replayed here with the same libraries (not its code): the captions are encoded
once with Qwen2.5-VL (the template, the 34 dropped tokens, the padding mask; the example caches
per-image prompts before training) and the encoder freed; each step reads and crops the images,
encodes them with the video VAE (frame axis added), normalizes by latents_mean / latents_std,
draws timesteps uniformly (`weighting_scheme none`), packs the latents, runs the transformer with
`img_shapes` and steps AdamW. Ours is `train.py`'s own path: latents and prompt encodings cached
once, the encoder freed. LoRA on the same modules both sides (attention + MLP Linears of every
block), same rank, resolution, batch and steps; each side in its own process (peak RSS; CUDA max
allocated on a GPU), the model built in a third (Linux carries a process's peak RSS across fork + exec).

The model: a transformer at Qwen-Image's real width (3072, 24 heads of 128, joint width 3584) with
`--blocks` of its 60 blocks, random weights; Qwen-Image's VAE config; a Qwen2.5-VL text model at
its real width (3584, 28 heads, 4 KV heads, MLP 18944) with `--te-layers` of its 28 layers (a
byte-level test tokenizer, so a small vocabulary; a one-layer vision tower it does not use).

    python bench/qwen_speed.py                       # 2 blocks, 256 px, 6 steps
    python bench/qwen_speed.py --blocks 4 --resolution 512 --steps 10
    python bench/qwen_speed.py --toy                 # tiny widths: both sides run (quick check)
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

from bench.side_by_side import add_side_args, compare, steady  # noqa: E402
from bench.image_speed import peak_memory  # noqa: E402

QWEN_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
QWEN_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                 rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                 rope_theta=1000000.0)
TOY_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, attention_head_dim=16, num_attention_heads=3,
                       joint_attention_dim=16, axes_dims_rope=(8, 4, 4))


def build_model(folder: Path, *, blocks: int, te_layers: int, toy: bool) -> Path:
    """A Qwen-Image-shaped diffusers folder with random weights."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from core.families.qwen_image.tiny import tiny_qwen_text_encoder, tiny_qwen_tokenizer, tiny_qwen_vae

    torch.manual_seed(0)
    tokenizer = tiny_qwen_tokenizer()
    if toy:
        transformer = QwenImageTransformer2DModel(num_layers=blocks, **TOY_TRANSFORMER)
        vae, text_encoder = tiny_qwen_vae(), tiny_qwen_text_encoder(tokenizer)
    else:
        transformer = QwenImageTransformer2DModel(num_layers=blocks, **QWEN_TRANSFORMER)
        vae = AutoencoderKLQwenImage()
        vocab = len(tokenizer) + 2
        config = Qwen2_5_VLConfig(text_config={**QWEN_TEXT, "num_hidden_layers": te_layers, "vocab_size": vocab},
                                  vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 64,
                                                 "num_heads": 2, "out_hidden_size": 3584},
                                  hidden_size=3584, vocab_size=vocab)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift=1.0)
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer).save_pretrained(folder)
    return folder


def run_ours(model: str, data: str, args: argparse.Namespace, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training

    stamps: list[float] = []
    out = tempfile.mkdtemp(prefix="qwen-ours-")
    cfg = config_from_dict(dict(
        base_model=model, train_data_dir=data, output_dir=out, resolution=args.resolution, batch_size=args.batch,
        max_train_steps=args.steps, learning_rate=1e-4, lora_rank=args.rank, lora_alpha=args.rank,
        mixed_precision="no", seed=0, save_steps=0, save_precision="fp32", timestep_sampling="uniform",
        min_bucket_reso=args.resolution, max_bucket_reso=args.resolution, cache_latents_to_disk=False))
    ctx = RunContext(listeners=[lambda e: stamps.append(time.perf_counter()) if e.kind == "progress" else None])
    run_training(cfg, ctx)
    total = time.perf_counter() - started
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    queue.put({"s_per_step": steady(per_step), "whole_run_s": total, **peak_memory()})


def run_peer(model: str, data: str, args: argparse.Namespace, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    import numpy as np
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from core.data.captions import read_metadata_csv
    from core.families.qwen_image.load import lora_targets

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage.from_pretrained(model, subfolder="vae")
    transformer = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    images = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    captions = read_metadata_csv(Path(data) / "metadata.csv").captions
    # Prompts encoded once, then the encoder freed (the example's per-image prompt cache).
    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, subfolder="text_encoder").eval()
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=encoder,
                             tokenizer=Qwen2Tokenizer.from_pretrained(model, subfolder="tokenizer"), transformer=None)
    cache = {}
    with torch.no_grad():
        for path in images:
            embeds, mask = pipe.encode_prompt([captions.get(path.name, "")], device=torch.device("cpu"))
            cache[path.name] = (embeds, mask if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.long))
    del pipe, encoder
    for module in (vae, transformer):
        module.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=lora_targets(transformer)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    scale = 2 ** len(vae.temperal_downsample)
    stamps = []
    for step in range(args.steps):
        batch = [images[(step * args.batch + i) % len(images)] for i in range(args.batch)]
        pixels = []
        for path in batch:
            image = Image.open(path).convert("RGB")
            side = min(image.size)
            image = image.crop(((image.width - side) // 2, (image.height - side) // 2,
                                (image.width + side) // 2, (image.height + side) // 2))
            image = image.resize((args.resolution, args.resolution), Image.BILINEAR)
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        with torch.no_grad():
            latents = vae.encode(torch.stack(pixels).unsqueeze(2)).latent_dist.sample()
        latents = (latents - mean) * std
        length = max(cache[p.name][0].shape[1] for p in batch)
        embeds = torch.cat([torch.nn.functional.pad(cache[p.name][0], (0, 0, 0, length - cache[p.name][0].shape[1]))
                            for p in batch])
        mask = torch.cat([torch.nn.functional.pad(cache[p.name][1], (0, length - cache[p.name][1].shape[1]))
                          for p in batch])
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=latents.shape[0])
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        b, c, _, h, w = latents.shape
        packed = QwenImagePipeline._pack_latents(noisy.permute(0, 2, 1, 3, 4), b, c, h, w)
        pred = transformer(hidden_states=packed, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                           timestep=timesteps / 1000, img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
        pred = QwenImagePipeline._unpack_latents(pred, h * scale, w * scale, scale)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    total = time.perf_counter() - started
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    queue.put({"s_per_step": steady(per_step), "whole_run_s": total, **peak_memory()})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (Qwen-Image has 60)")
    parser.add_argument("--te-layers", type=int, default=2, help="Qwen2.5-VL text layers kept (of 28)")
    add_side_args(parser)
    args = parser.parse_args(argv)
    return compare(args, build_model, dict(blocks=args.blocks, te_layers=args.te_layers, toy=args.toy), run_ours,
                   run_peer, prefix="qwen-bench-", shape=f"{args.blocks} blocks at width {3072 if not args.toy else 48}")


if __name__ == "__main__":
    main()
