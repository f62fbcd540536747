"""SD3.5 LoRA training speed and memory: this trainer vs the diffusers example's loop, in one run.

The peer is diffusers' `examples/dreambooth/train_dreambooth_lora_sd3.py`. It imports torchvision,
which does not import beside the torch this project pins, so its per-step work is replayed here with
the same libraries (not its code): each step reads and crops the images, encodes them with the VAE,
encodes the captions with CLIP-L, CLIP-G and T5 (the example does that every step when each image has
its own caption), draws sigmas as its defaults do (`weighting_scheme logit_normal` through the
scheduler's shift-3.0 timesteps), runs the transformer, preconditions the output to an x0 estimate
(`precondition_outputs 1`) and steps AdamW. Ours is `train.py`'s own path: latents and text encodings
cached once, the encoders freed before the transformer trains. The LoRA goes on the same modules on
both sides (every block's attention and MLP, our default), at the same rank, resolution, batch and
number of steps. Each side runs in its own process, so peak memory (RSS; CUDA max allocated on a GPU)
is its own.

The model: an SD3Transformer2DModel at SD3.5 medium's real width (1536: 24 heads of 64, joint width
4096, pooled 2048, qk RMS norm, the first block with the dual attention) with few blocks (`--blocks`),
random weights; SD3's 16-channel VAE config; CLIP-L's config; CLIP-G and T5-XXL at their real widths with
`--clip-g-layers` of 32 and `--t5-layers` of 24 layers (the full encoders would not fit this machine twice).

    python bench/sd3_speed.py                         # 2 blocks, 256 px, 6 steps
    python bench/sd3_speed.py --blocks 4 --resolution 512 --steps 10
    python bench/sd3_speed.py --toy                   # tiny widths: checks that both sides run (tests use it)

Prints s/step (steady state: the first step left out), the whole run and the peak memory of both
sides, and ours/peer ratios.
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

SD35_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=24,
                        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                        out_channels=16, pos_embed_max_size=384, dual_attention_layers=(0,), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.0609, scaling_factor=1.5305, norm_num_groups=32, sample_size=1024)
CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
CLIP_L = dict(CLIP, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(CLIP, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, hidden_act="gelu",
              projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False, use_cache=False)


def build_model(folder: Path, *, blocks: int, clip_g_layers: int, t5_layers: int, toy: bool) -> Path:
    """An SD3.5-medium-shaped diffusers folder with random weights."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from core.families.tiny_parts import tiny_t5_tokenizer
    from core.families.tiny_parts import tiny_tokenizer
    from core.families.sd3.tiny import tiny_sd3_t5, tiny_sd3_transformer, tiny_sd3_vae

    torch.manual_seed(0)
    if toy:
        transformer, vae, t5 = tiny_sd3_transformer(), tiny_sd3_vae(), tiny_sd3_t5()
        small = dict(CLIP, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                     projection_dim=32)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**small))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**small))
    else:
        transformer = SD3Transformer2DModel(num_layers=blocks, **SD35_TRANSFORMER)
        vae = AutoencoderKL(**SD3_VAE)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, num_hidden_layers=clip_g_layers))
        t5 = T5EncoderModel(T5Config(**T5_XXL, num_layers=t5_layers))
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip_l.eval(), tokenizer=tiny_tokenizer(),
                                    text_encoder_2=clip_g.eval(), tokenizer_2=tiny_tokenizer(),
                                    text_encoder_3=t5.eval(), tokenizer_3=tiny_t5_tokenizer(), transformer=transformer)
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
        base_model=model, train_data_dir=data, output_dir=tempfile.mkdtemp(prefix="sd3-ours-"),
        resolution=args.resolution, batch_size=args.batch, max_train_steps=args.steps, learning_rate=1e-4,
        lora_rank=args.rank, lora_alpha=args.rank, mixed_precision="no", seed=0, save_steps=0,
        save_precision="fp32", min_bucket_reso=args.resolution, max_bucket_reso=args.resolution,
        cache_latents_to_disk=False))
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
    from diffusers import StableDiffusion3Pipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig
    from PIL import Image

    from core.data.captions import read_metadata_csv
    from core.families.sd3.family import lora_targets

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    vae, transformer, scheduler = pipe.vae, pipe.transformer, pipe.scheduler
    for module in (vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, transformer):
        module.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=lora_targets(transformer)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    captions = read_metadata_csv(Path(data) / "metadata.csv").captions
    stamps = []
    for step in range(args.steps):
        batch = [images[(step * args.batch + i) % len(images)] for i in range(args.batch)]
        prompts = [captions.get(p.name, "") for p in batch]
        pixels = []
        for path in batch:
            image = Image.open(path).convert("RGB")
            side = min(image.size)
            image = image.crop(((image.width - side) // 2, (image.height - side) // 2,
                                (image.width + side) // 2, (image.height + side) // 2))
            image = image.resize((args.resolution, args.resolution), Image.BILINEAR)
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        with torch.no_grad():
            latents = vae.encode(torch.stack(pixels)).latent_dist.sample()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                             max_sequence_length=256)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=latents.shape[0],
                                                  logit_mean=0.0, logit_std=1.0)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        pred = pred * (-sigmas) + noisy
        loss = torch.mean(((pred.float() - latents.float()) ** 2).reshape(latents.shape[0], -1), 1).mean()
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
    parser.add_argument("--blocks", type=int, default=2, help="joint blocks (SD3.5 medium has 24)")
    parser.add_argument("--clip-g-layers", type=int, default=4, help="CLIP-G layers kept (of 32)")
    parser.add_argument("--t5-layers", type=int, default=2, help="T5-XXL encoder layers kept (of 24)")
    add_side_args(parser)
    args = parser.parse_args(argv)
    return compare(args, build_model, dict(blocks=args.blocks, clip_g_layers=args.clip_g_layers,
                                           t5_layers=args.t5_layers, toy=args.toy), run_ours, run_peer,
                   prefix="sd3-bench-", shape=f"{args.blocks} blocks at width {1536 if not args.toy else 32}")


if __name__ == "__main__":
    main()
