"""Tiny FLUX.1 (dev, schnell) and Chroma pipelines built from configs with the real classes.

diffusers' own tiny FLUX test config (1 double + 1 single block, width 32, a 1-channel
AE without downscaling), a tiny CLIP-L and T5 (width 32) and tokenizers built in code.
Each is saved as a diffusers folder; FLUX also in ComfyUI's layout (BFL-named
transformer with the `model.diffusion_model.` prefix, clip_l / t5xxl / ae files) so tests
and benchmarks load them the way users have them. For tests and `bench/` only (never imported by the app).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import (clip_text_encoder, save_state_files, tiny_flow_vae, tiny_t5, tiny_t5_tokenizer,
                                      tiny_tokenizer)

WIDTH = 32   # T5 d_model = CLIP hidden = transformer joint_attention_dim = pooled_projection_dim


@dataclass
class TinyFlux:
    variant: str
    folder: Path                        # diffusers folder (configs + tokenizers + weights)
    comfy_transformer: Path | None = None  # models/diffusion_models/<name>.safetensors (BFL names)
    comfy_root: Path | None = None      # the ComfyUI models/ folder


def tiny_flux_t5(seed: int = 5):
    """The T5-XXL stand-in of FLUX and Chroma (width 32)."""
    return tiny_t5(WIDTH, d_kv=8, d_ff=64, seed=seed)


def tiny_flux_vae():
    """One latent channel: 4 channels once packed."""
    return tiny_flow_vae(latent_channels=1, scaling_factor=1.5035)


def tiny_flux_transformer(guidance: bool = True, seed: int = 7):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                                  pooled_projection_dim=WIDTH, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance)


def tiny_chroma_transformer(seed: int = 8):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                                    axes_dims_rope=[4, 4, 8], approximator_num_channels=8, approximator_hidden_dim=16,
                                    approximator_layers=1)


def write_comfy_layout(pipe, root: Path, name: str) -> tuple[Path, Path]:
    """Write ComfyUI's layout of a FLUX pipeline: BFL transformer, clip_l, t5xxl (fp16) and ae files."""
    from core.families.flux.convert import diffusers_to_bfl
    from core.families.sd.convert import vae_to_ldm

    models = root / "models"
    # FLUX: CLIP-L is text_encoder, T5 text_encoder_2; Chroma has only the T5, as text_encoder.
    t5 = getattr(pipe, "text_encoder_2", None) or pipe.text_encoder
    files = {
        models / "diffusion_models" / f"{name}.safetensors":
            diffusers_to_bfl(pipe.transformer.state_dict(), prefix="model.diffusion_model."),
        models / "text_encoders" / "t5xxl_fp16.safetensors":
            {k: v.half() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
        models / "vae" / "ae.safetensors": vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
    }
    if t5 is not pipe.text_encoder:
        files[models / "text_encoders" / "clip_l.safetensors"] = pipe.text_encoder.state_dict()
    return save_state_files(files), models


def build_tiny_flux(root: Path, variant: str = "flux-dev", *, comfy: bool = True) -> TinyFlux:
    """Build and save a tiny `variant` (flux-dev | flux-schnell | chroma) pipeline under `root`."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    root = Path(root)
    folder = root / f"tiny-{variant}"
    scheduler = FlowMatchEulerDiscreteScheduler()
    if variant == "chroma":
        pipe = ChromaPipeline(scheduler=scheduler, vae=tiny_flux_vae(), text_encoder=tiny_flux_t5(),
                              tokenizer=tiny_t5_tokenizer(), transformer=tiny_chroma_transformer())
        pipe.save_pretrained(folder)
        transformer_file, models = write_comfy_layout(pipe, root / "ComfyUI", "chroma1-hd")
        return TinyFlux(variant, folder, transformer_file, models)
    kind = FluxKontextPipeline if variant == "flux-kontext" else FluxPipeline
    pipe = kind(scheduler=scheduler, vae=tiny_flux_vae(), text_encoder=clip_text_encoder(WIDTH, seed=3),
                tokenizer=tiny_tokenizer(), text_encoder_2=tiny_flux_t5(), tokenizer_2=tiny_t5_tokenizer(),
                transformer=tiny_flux_transformer(guidance=variant in ("flux-dev", "flux-kontext")))
    pipe.save_pretrained(folder)
    if not comfy:
        return TinyFlux(variant, folder)
    transformer_file, models = write_comfy_layout(pipe, root / "ComfyUI", f"flux1-{variant.split('-')[1]}")
    return TinyFlux(variant, folder, transformer_file, models)
