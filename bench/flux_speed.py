"""FLUX LoRA training speed and memory: this trainer vs the diffusers example's loop, in one run.

The peer is diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`. It imports
torchvision, which does not import beside the torch this project pins, so its per-step work
is replayed here with the same libraries (not its code): each step reads and crops the
images, encodes them with the VAE, encodes the captions with CLIP and T5 (the example does
that every step when each image has its own caption), draws timesteps uniformly
(`weighting_scheme none`), packs the latents, runs the transformer with the guidance input,
and steps AdamW. Ours is `train.py`'s own path: latents and text encodings cached once, the
encoders freed before the transformer trains. The LoRA goes on the same modules on both
sides (our `lora_blocks: all`), at the same rank, resolution, batch and number of steps.
Each side runs in its own process, so peak memory (RSS; CUDA max allocated on a GPU) is its own;
the model is built in a third one, since Linux carries a process's peak RSS across fork + exec
(a side spawned by a parent that built the model would start at the parent's peak).

The model: a transformer at FLUX.1's real width (3072, 24 heads of 128, joint width 4096,
pooled 768) with few blocks (`--double`, `--single`), random weights (speed does not depend
on them); FLUX.1's AE config; CLIP-L's config; a T5 at T5-XXL's width with `--t5-layers`
of its 24 layers (the full encoder would not fit this machine twice).

    python bench/flux_speed.py                         # 1 double + 2 single blocks, 256 px, 6 steps
    python bench/flux_speed.py --double 2 --single 4 --resolution 512 --steps 10
    python bench/flux_speed.py --toy                   # tiny widths: checks that both sides run (tests use it)

Prints s/step (steady state: the first step left out), the whole run and the peak memory of
both sides, and ours/peer ratios.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.image_speed import peak_memory  # noqa: E402  (the one peak RSS / CUDA peak reading)
from bench.side_by_side import add_side_args, compare, steady  # noqa: E402

# FLUX.1's published configs (black-forest-labs/FLUX.1-dev: transformer, vae), blocks cut down.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                        axes_dims_rope=(16, 56, 56))
FLUX_AE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.1159, scaling_factor=0.3611, norm_num_groups=32, sample_size=1024)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False, use_cache=False)
TOY = dict(transformer=dict(patch_size=1, in_channels=4, attention_head_dim=16, num_attention_heads=2,
                            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                            axes_dims_rope=(4, 4, 8)),
           ae=dict(in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(4,), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                   norm_num_groups=1, sample_size=32))


def build_model(folder: Path, *, double: int, single: int, t5_layers: int, toy: bool) -> Path:
    """A FLUX.1-dev-shaped diffusers folder with random weights."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from core.families.tiny_parts import tiny_t5_tokenizer
    from core.families.tiny_parts import tiny_tokenizer

    torch.manual_seed(0)
    if toy:
        transformer = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **TOY["transformer"])
        vae = AutoencoderKL(**TOY["ae"])
        clip = CLIPTextModel(CLIPTextConfig(**{**CLIP_L, "hidden_size": 32, "intermediate_size": 37,
                                               "num_attention_heads": 4, "num_hidden_layers": 1,
                                               "projection_dim": 32}))
        t5 = T5EncoderModel(T5Config(**{**T5_XXL, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_heads": 4,
                                        "num_layers": t5_layers}))
    else:
        transformer = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_AE)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        t5 = T5EncoderModel(T5Config(**T5_XXL, num_layers=t5_layers))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                        vae=vae, text_encoder=clip.eval(), tokenizer=tiny_tokenizer(), text_encoder_2=t5.eval(),
                        tokenizer_2=tiny_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(folder)
    write_unigram_t5_tokenizer(folder / "tokenizer_2")
    return folder


def write_unigram_t5_tokenizer(folder: Path) -> None:
    """The test T5 tokenizer's words, ids and </s> as a Unigram (SentencePiece-style) tokenizer: diffusers' FLUX
    example loads tokenizer_2 as T5TokenizerFast, which (transformers 5) reads a Unigram vocabulary and refuses
    the word-level one; ours reads either. A word is one piece ("\u2581word"), so both give the same ids."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from core.families.tiny_parts import T5_WORDS

    pieces = ["<pad>", "</s>", "<unk>"] + [f"\u2581{w}" for w in dict.fromkeys(T5_WORDS) if w not in ("<pad>", "</s>", "<unk>")]
    tokenizer = Tokenizer(models.Unigram([(p, 0.0 if n < 3 else -1.0) for n, p in enumerate(pieces)], unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
         "model_max_length": 512, "extra_ids": 0}, indent=1))


# --- ours -------------------------------------------------------------------------------------

def run_ours(model: str, data: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from core.config import config_from_dict
    from core.events import RunContext
    from core.train import run_training

    stamps: list[float] = []
    out = tempfile.mkdtemp(prefix="flux-ours-")
    cfg = config_from_dict(dict(
        base_model=model, train_data_dir=data, output_dir=out, resolution=args.resolution, batch_size=args.batch,
        max_train_steps=args.steps, learning_rate=1e-4, lora_rank=args.rank, lora_alpha=args.rank,
        mixed_precision="no", seed=0, save_steps=0, save_precision="fp32", lora_blocks="all",
        min_bucket_reso=args.resolution, max_bucket_reso=args.resolution, cache_latents_to_disk=False))
    ctx = RunContext(listeners=[lambda e: stamps.append(time.perf_counter()) if e.kind == "progress" else None])
    run_training(cfg, ctx)
    total = time.perf_counter() - started
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    queue.put({"s_per_step": steady(per_step), "whole_run_s": total, **peak_memory()})


# --- the peer's loop (diffusers' train_dreambooth_lora_flux.py, replayed) ------------------------

def run_peer(model: str, data: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    import numpy as np
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, T5EncoderModel

    from core.data.captions import read_metadata_csv
    from core.families.flux.lora import flux_lora_targets

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    clip = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    t5 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2")
    tok_clip = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    tok_t5 = PreTrainedTokenizerFast.from_pretrained(model, subfolder="tokenizer_2")
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    for module in (vae, clip, t5, transformer):
        module.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=flux_lora_targets(transformer, "all")))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    captions = read_metadata_csv(Path(data) / "metadata.csv").captions
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    stamps = []
    for step in range(args.steps):
        batch = [images[(step * args.batch + i) % len(images)] for i in range(args.batch)]
        prompts = [captions.get(p.name, "") for p in batch]
        # Read, resize and center-crop every image, every step (its DreamBooth dataset does).
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
            ids = tok_clip(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            pooled = clip(ids.input_ids, output_hidden_states=False).pooler_output
            ids = tok_t5(prompts, padding="max_length", max_length=args.t5_length, truncation=True,
                         return_tensors="pt")
            prompt_embeds = t5(ids.input_ids)[0]
        text_ids = torch.zeros(prompt_embeds.shape[1], 3)
        image_ids = FluxPipeline._prepare_latent_image_ids(latents.shape[0], latents.shape[2] // 2,
                                                           latents.shape[3] // 2, latents.device, latents.dtype)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=latents.shape[0])
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, *latents.shape[:2], latents.shape[2], latents.shape[3])
        guidance = torch.full((latents.shape[0],), 3.5)
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                           img_ids=image_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, latents.shape[2] * scale, latents.shape[3] * scale, scale)
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
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1 has 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1 has 38)")
    parser.add_argument("--t5-layers", type=int, default=2, help="T5-XXL encoder layers kept (of 24)")
    parser.add_argument("--t5-length", type=int, default=512, help="T5 tokens per caption (FLUX.1-dev: 512)")
    add_side_args(parser)
    args = parser.parse_args(argv)
    if args.toy:
        args.t5_length = min(args.t5_length, 512)
    return compare(args, build_model, dict(double=args.double, single=args.single, t5_layers=args.t5_layers,
                                           toy=args.toy), run_ours, run_peer, prefix="flux-bench-",
                   shape=f"{args.double} double + {args.single} single blocks at width {3072 if not args.toy else 32}")


if __name__ == "__main__":
    main()
