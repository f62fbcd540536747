"""A tiny Z-Image pipeline built from diffusers' own test config (tests/pipelines/z_image).

Transformer width 32 (2 layers, 1 noise- and 1 context-refiner layer), a 2-layer Qwen3 text
encoder of width 16, a 16-channel AE with one 2x downscale and FLUX's scaling/shift, a BPE
tokenizer trained offline with a ChatML template (Qwen's chat template without thinking
markers, as `enable_thinking=True` renders it). Saved as a diffusers folder named
`tiny-z-image-turbo` and in ComfyUI's layout (native transformer names with the
`model.diffusion_model.` prefix, qwen_3_4b and ae files). For tests and `bench/` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import (chat_bpe_tokenizer, save_state_files)


@dataclass
class TinyZImage:
    folder: Path              # diffusers folder
    comfy_transformer: Path   # models/diffusion_models/z_image_turbo_bf16.safetensors (native names)
    comfy_root: Path          # the ComfyUI models/ folder


def tiny_zimage_transformer(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                     cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                     axes_lens=[256, 32, 32])
    with torch.no_grad():  # torch.empty in diffusers: fixed values (diffusers' test does the same)
        model.x_pad_token.copy_(torch.ones_like(model.x_pad_token))
        model.cap_pad_token.copy_(torch.ones_like(model.cap_pad_token))
    return model


def tiny_zimage_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                         latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                         shift_factor=0.1159)


def tiny_qwen3(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=vocab_size, max_position_embeddings=512)
    return Qwen3Model(config).eval()


def native_transformer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> native (ComfyUI) names: fused qkv, attention.out, q_norm/k_norm, x_embedder, final_layer."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts, dim=0)
            continue
        key = (key.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
               .replace(".attention.norm_k.", ".attention.k_norm.").replace("all_x_embedder.2-1.", "x_embedder.")
               .replace("all_final_layer.2-1.", "final_layer."))
        out[key] = value
    return out


def build_tiny_zimage(root: Path) -> TinyZImage:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from core.families.sd.convert import vae_to_ldm
    root = Path(root)
    tokenizer = chat_bpe_tokenizer()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_zimage_vae(),
                          text_encoder=tiny_qwen3(len(tokenizer)), tokenizer=tokenizer,
                          transformer=tiny_zimage_transformer())
    folder = root / "tiny-z-image-turbo"
    pipe.save_pretrained(folder)
    models = root / "ComfyUI" / "models"
    files = {
        models / "diffusion_models" / "z_image_turbo_bf16.safetensors":
            {f"model.diffusion_model.{k}": v for k, v in native_transformer_state(pipe.transformer.state_dict()).items()},
        # ComfyUI's qwen_3_4b file holds Qwen3ForCausalLM names (`model.` prefix).
        models / "text_encoders" / "qwen_3_4b.safetensors":
            {f"model.{k}": v.half() for k, v in pipe.text_encoder.state_dict().items()},
        models / "vae" / "ae.safetensors": vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
    }
    save_state_files(files)
    return TinyZImage(folder, models / "diffusion_models" / "z_image_turbo_bf16.safetensors", models)
