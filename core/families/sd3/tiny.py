"""Tiny Stable Diffusion 3.5 (medium- and large-shaped) pipelines built from configs with the real classes.

diffusers' tiny SD3 test config (tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py:
width 32, a 1-block AE without downscaling, shift 0.0609) with two blocks, patch size 2 like the real
model, and the 3.5 traits: qk RMS norms, and for the medium shape a dual-attention first block. CLIP-L and
CLIP-G (with projections), T5 and the tokenizers are built in code (no downloads). Saved as a diffusers
folder and in ComfyUI's layouts: the MMDiT transformer alone in models/diffusion_models with clip_l /
clip_g / t5xxl in models/text_encoders and the VAE in models/vae, and SAI's all-in-one file (MMDiT + the
three encoders + VAE) in models/checkpoints. For tests and `bench/` only (never imported by the app).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import (clip_text_encoder, save_state_files, tiny_flow_vae, tiny_t5, tiny_t5_tokenizer,
                                      tiny_tokenizer)

CLIP_WIDTH = 32   # CLIP-L and CLIP-G hidden size (pooled: 32 + 32 = pooled_projection_dim)
T5_WIDTH = 64     # = joint_attention_dim (CLIP's 32 + 32 are padded to it)


@dataclass
class TinySD3:
    variant: str                          # "sd3" (3.5 medium shape) or "sd35-large"
    folder: Path                          # diffusers folder
    comfy_transformer: Path | None = None  # models/diffusion_models/<name>.safetensors (MMDiT names)
    comfy_checkpoint: Path | None = None   # models/checkpoints/<name>.safetensors (all in one)
    comfy_root: Path | None = None         # ComfyUI's models/ folder


def tiny_sd3_t5(seed: int = 5):
    """The T5-XXL stand-in of SD3 (width 64 = the joint attention width)."""
    return tiny_t5(T5_WIDTH, d_kv=16, d_ff=96, seed=seed)


def tiny_sd3_vae():
    return tiny_flow_vae(latent_channels=4, scaling_factor=1.5305)


def tiny_sd3_transformer(variant: str = "sd3", seed: int = 7):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_WIDTH,
                                 pooled_projection_dim=2 * CLIP_WIDTH, out_channels=4, pos_embed_max_size=64,
                                 dual_attention_layers=(0,) if variant == "sd3" else (), qk_norm="rms_norm")


def _clip_to_file(model) -> dict[str, torch.Tensor]:
    # ComfyUI's clip_l / clip_g files: HF CLIPTextModelWithProjection names (text_model.*, text_projection).
    return {k: v for k, v in model.state_dict().items() if "position_ids" not in k}


def write_comfy_layout(pipe, root: Path, name: str) -> tuple[Path, Path, Path]:
    """ComfyUI's two layouts of an SD3 pipeline: split files, and SAI's all-in-one checkpoint."""

    from core.families.sd3.keys import diffusers_to_mmdit
    from core.families.sd.convert import vae_to_ldm

    models = root / "models"
    mmdit = diffusers_to_mmdit(pipe.transformer.state_dict(), prefix="model.diffusion_model.")
    clip_l, clip_g = _clip_to_file(pipe.text_encoder), _clip_to_file(pipe.text_encoder_2)
    t5 = {k: v for k, v in pipe.text_encoder_3.state_dict().items() if k != "encoder.embed_tokens.weight"}
    vae = vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config))
    everything = {**mmdit, **{f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l.items()},
                  **{f"text_encoders.clip_g.transformer.{k}": v for k, v in clip_g.items()},
                  **{f"text_encoders.t5xxl.transformer.{k}": v.half() for k, v in t5.items()},
                  **{f"first_stage_model.{k}": v for k, v in vae.items()}}
    files = {
        models / "diffusion_models" / f"{name}.safetensors": mmdit,
        models / "text_encoders" / "clip_l.safetensors": clip_l,
        models / "text_encoders" / "clip_g.safetensors": clip_g,
        models / "text_encoders" / "t5xxl_fp16.safetensors": {k: v.half() for k, v in t5.items()},
        models / "vae" / "sd35_vae.safetensors": vae,
        models / "checkpoints" / f"{name}_incl_clips_t5xxlfp16.safetensors": everything,
    }
    save_state_files(files)
    return (models / "diffusion_models" / f"{name}.safetensors",
            models / "checkpoints" / f"{name}_incl_clips_t5xxlfp16.safetensors", models)


def build_tiny_sd3(root: Path, variant: str = "sd3", *, comfy: bool = True) -> TinySD3:
    """Build and save a tiny `variant` ("sd3": SD3.5-medium-shaped, "sd35-large") pipeline under `root`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    root = Path(root)
    folder = root / f"tiny-{variant}"
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_sd3_vae(),
        text_encoder=clip_text_encoder(CLIP_WIDTH, projection=CLIP_WIDTH, seed=3), tokenizer=tiny_tokenizer(),
        text_encoder_2=clip_text_encoder(CLIP_WIDTH, projection=CLIP_WIDTH, seed=4), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=tiny_sd3_t5(), tokenizer_3=tiny_t5_tokenizer(), transformer=tiny_sd3_transformer(variant))
    pipe.save_pretrained(folder)
    if not comfy:
        return TinySD3(variant, folder)
    name = "sd3.5_medium" if variant == "sd3" else "sd3.5_large"
    transformer, checkpoint, models = write_comfy_layout(pipe, root / "ComfyUI", name)
    return TinySD3(variant, folder, transformer, checkpoint, models)
