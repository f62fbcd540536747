"""Tiny Stable Diffusion models built from configs with the real classes (no downloads).

`build_tiny_sd` gives a tiny SD 1.x, a v-prediction SD 2.x-like or a tiny SDXL pipeline, saved as a
diffusers folder AND as a single-file checkpoint written with `core.families.sd.convert`, so tests and
benchmarks load them through the same code paths users take. `build_tiny_sd1` / `build_tiny_sdxl`
make in-memory pipelines with the block layouts the LoRA key formats care about (the file-format
tests). For tests and `bench/` only: the app never imports this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import clip_text_encoder as _text_encoder
from core.families.tiny_parts import tiny_tokenizer

TE_HIDDEN = 32      # CLIP-L stand-in
TE2_HIDDEN = 64     # OpenCLIP-G stand-in (must differ from TE_HIDDEN: diffusers tells them apart by size)
TE2_PROJ = 32


@dataclass
class TinyModel:
    family: str
    folder: Path        # diffusers folder
    single_file: Path   # original-layout .safetensors


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    # Four blocks: the same 8x downscale as the real SD VAE, so 64 px images give 8x8 latents.
    return AutoencoderKL(block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         layers_per_block=1,
                         latent_channels=4, norm_num_groups=32, sample_size=64)


def tiny_unet(*, xl: bool = False, linear_proj: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    # SDXL keeps 2 layers per block: its kohya (sgm) block numbering assumes that layout.
    common = dict(block_out_channels=(32, 64), layers_per_block=2 if xl else 1, sample_size=8, in_channels=4,
                  out_channels=4, norm_num_groups=32, attention_head_dim=8)
    if xl:
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TE_HIDDEN + TE2_HIDDEN, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TE2_PROJ, **common)
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TE_HIDDEN, use_linear_projection=linear_proj, **common)


def _scheduler(prediction_type: str = "epsilon", *, euler: bool = False):
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    kind = EulerDiscreteScheduler if euler else DDPMScheduler
    return kind(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                prediction_type=prediction_type, steps_offset=1)


def build_tiny_sd(root: Path, family: str = "sd1") -> TinyModel:
    """Build and save a tiny pipeline of `family` (sd1 | sd2 | sdxl) under `root`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from core.families.sd.convert import pipeline_to_single_file
    from core.atomic import save_file_atomic

    root = Path(root)
    folder = root / f"tiny-{family}"
    if family == "sdxl":
        te1 = _text_encoder(TE_HIDDEN, seed=3)
        te2 = _text_encoder(TE2_HIDDEN, projection=TE2_PROJ, seed=4)
        pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2,
                                         tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer("!"),
                                         unet=tiny_unet(xl=True), scheduler=_scheduler(euler=True))
        encoders = [te1, te2]
    else:
        te = _text_encoder(TE_HIDDEN, seed=3)
        pred = "v_prediction" if family == "sd2" else "epsilon"
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tiny_tokenizer(),
                                       unet=tiny_unet(linear_proj=family == "sd2"), scheduler=_scheduler(pred),
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        encoders = [te]
    pipe.save_pretrained(folder)
    single = root / f"tiny-{family}.safetensors"
    save_file_atomic(pipeline_to_single_file(family, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders),
                     single)
    return TinyModel(family, folder, single)


# The file-format tests' pipelines: built in memory, same weights for the same seed.
TOKEN_WORDS = ["a", "photo", "of", "sks", "cat", "dog", "in", "the", "style"]


def write_tiny_clip_tokenizer(folder: Path, max_length: int = 16) -> Path:
    """A CLIP BPE tokenizer over a tiny vocabulary, written as vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[str] = []
    for word in TOKEN_WORDS:
        # Merge the word left to right so each listed word becomes one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}),
                                                  encoding="utf-8")
    return folder


def _clip_text_config(hidden: int, vocab_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                          projection_dim=projection_dim or hidden, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, hidden_act="quick_gelu")


def _file_format_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=32)


def build_tiny_sd1(tokenizer_dir: Path, seed: int = 0):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_encoder = CLIPTextModel(_clip_text_config(32, len(tokenizer)))
    vae = _file_format_vae()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(tokenizer_dir: Path, seed: int = 0):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    te1_hidden, te2_hidden, te2_proj, time_dim = 32, 32, 16, 8
    # Same block layout as SDXL base (no attention at level 0, 2 layers per block), with
    # transformer depth > 1 at the deepest level so the sgm mapping sees several blocks.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
        cross_attention_dim=te1_hidden + te2_hidden, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + te2_proj, norm_num_groups=16)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_encoder = CLIPTextModel(_clip_text_config(te1_hidden, len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(te2_hidden, len(tokenizer), te2_proj))
    pipe = StableDiffusionXLPipeline(vae=_file_format_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
                                     unet=unet, scheduler=DDPMScheduler(steps_offset=1, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe
