"""A tiny Wan 2.1 T2V pipeline built from diffusers' own test config (tests/pipelines/wan/test_wan.py).

Transformer: 2 heads of 12 (width 24), 2 blocks, FFN 32, text width 32; the Wan VAE with base_dim 3 and
z_dim 16 (8x spatial, 4x temporal: 9 frames -> 3 latent frames); a 2-layer UMT5 encoder of width 32 over a
word-level T5 tokenizer. Saved as a diffusers folder `tiny-wan2.1-t2v` and in ComfyUI's layout: the
transformer in Wan's native names (`model.diffusion_model.blocks.0.self_attn.q.weight`), the UMT5 file in HF
names (umt5_xxl_fp16.safetensors) and the VAE (wan_2.1_vae.safetensors, in diffusers' names: diffusers' VAE
converter is written for the real VAE's block layout). For tests and `bench/` only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import tiny_t5_tokenizer
from core.families.tiny_parts import T5_WORDS

TEXT_WIDTH = 32


@dataclass
class TinyWan:
    folder: Path              # diffusers folder
    comfy_transformer: Path   # models/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors (native names)
    comfy_root: Path          # the ComfyUI models/ folder


def tiny_wan_transformer(seed: int = 0, *, in_channels: int = 16, image_dim: int | None = None):
    """`in_channels` 36: image to video; `image_dim`: Wan 2.1 I2V's CLIP features (with k_img / v_img)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    image = dict(image_dim=image_dim, added_kv_proj_dim=24) if image_dim else {}
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=16, text_dim=TEXT_WIDTH, freq_dim=256, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                 **image)


def tiny_clip_vision(seed: int = 3):
    """diffusers' test image encoder for Wan 2.1 I2V (CLIP vision, width 4, 32 px) and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, intermediate_size=16, patch_size=1)
    return CLIPVisionModel(config).eval(), CLIPImageProcessor(crop_size=32, size=32)


def tiny_wan_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def tiny_wan22_vae(seed: int = 0):
    """Wan 2.2's VAE in small (diffusers' TI2V-5B test): 48 latent channels, residual, pixels patchified 2x2 (16x
    spatial in all); its per-channel statistics not the identity, so normalising them is tested."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                            latents_mean=[0.01 * (i % 7) for i in range(48)],
                            latents_std=[1.0 + 0.05 * (i % 5) for i in range(48)], dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, scale_factor_spatial=16, temperal_downsample=[False, True, True])


def tiny_umt5(seed: int = 5):
    """A 2-layer UMT5 encoder (per-layer relative attention, as UMT5-XXL) over the tiny T5 tokenizer's words."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(T5_WORDS) + 3, d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


# diffusers -> native (the inverse of diffusers' convert_wan_transformer_to_diffusers)
_NATIVE = (("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),  # Wan 2.1 I2V's CLIP projection
           ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
           ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
           ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
           ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
           ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
           ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
           ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
           ("condition_embedder.time_proj", "time_projection.1"),
           (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
           (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
           (".norm_added_k.", ".norm_k_img."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"))


def native_transformer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> Wan's native names (ComfyUI's comfy/ldm/wan/model.py)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for ours, native in _NATIVE:
            key = key.replace(ours, native)
        key = re.sub(r"^(blocks\.\d+\.)norm2\.", r"\1norm3.", key)  # the cross-attention norm is norm3 natively
        key = re.sub(r"^(blocks\.\d+\.)scale_shift_table$", r"\1modulation", key)
        key = {"scale_shift_table": "head.modulation", "proj_out.weight": "head.head.weight",
               "proj_out.bias": "head.head.bias"}.get(key, key)
        out[key] = value
    return out


def build_tiny_wan(root: Path, a14b: bool = False, i2v: bool = False, ti2v: bool = False) -> TinyWan:
    """The tiny Wan 2.1 T2V; `a14b`: a tiny Wan 2.2 A14B (two experts split at boundary_ratio 0.875), whose ComfyUI
    files are wan2.2_t2v_high_noise_14B_fp16 / _low_noise_ (`comfy_transformer`: the high-noise one); `i2v`: the
    image-to-video one (36 input channels; without `a14b` Wan 2.1 I2V's CLIP image encoder too), saved as a
    WanImageToVideoPipeline (ComfyUI: wan2.1_i2v_480p_14B_fp16 / wan2.2_i2v_high_noise_14B_fp16); `ti2v`: a tiny
    Wan 2.2 TI2V-5B (48-channel VAE, expand_timesteps; ComfyUI: wan2.2_ti2v_5B_fp16 with wan2.2_vae beside the
    Wan 2.1 VAE, which it must not take)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from safetensors.torch import save_file

    root = Path(root)
    if ti2v:
        return _build_tiny_ti2v(root)
    channels = dict(in_channels=36) if i2v else {}
    image = i2v and not a14b
    experts = dict(transformer_2=tiny_wan_transformer(seed=1, **channels), boundary_ratio=0.875) if a14b else {}
    if image:
        encoder, processor = tiny_clip_vision()
        experts.update(image_encoder=encoder, image_processor=processor)
    pipeline = WanImageToVideoPipeline if i2v else WanPipeline
    pipe = pipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_umt5(), vae=tiny_wan_vae(),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                    transformer=tiny_wan_transformer(**channels, image_dim=4 if image else None), **experts)
    kind = "i2v" if i2v else "t2v"
    folder = root / (f"tiny-wan2.2-{kind}-a14b" if a14b else f"tiny-wan2.1-{kind}")
    pipe.save_pretrained(folder)
    models = root / "ComfyUI" / "models"
    name = (f"wan2.2_{kind}_high_noise_14B_fp16.safetensors" if a14b else
            "wan2.1_i2v_480p_14B_fp16.safetensors" if i2v else "wan2.1_t2v_1.3B_bf16.safetensors")
    transformer_file = models / "diffusion_models" / name
    files = {
        transformer_file: {f"model.diffusion_model.{k}": v
                           for k, v in native_transformer_state(pipe.transformer.state_dict()).items()},
        models / "text_encoders" / "umt5_xxl_fp16.safetensors":
            {k: v.half() for k, v in pipe.text_encoder.state_dict().items()},
        models / "vae" / "wan_2.1_vae.safetensors": dict(pipe.vae.state_dict()),
    }
    if a14b:
        files[transformer_file.with_name(name.replace("high_noise", "low_noise"))] = {
            f"model.diffusion_model.{k}": v for k, v in native_transformer_state(pipe.transformer_2.state_dict()).items()}
    for path, state in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return TinyWan(folder, transformer_file, models)


def _build_tiny_ti2v(root: Path) -> TinyWan:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import save_file

    torch.manual_seed(2)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=48, out_channels=48, text_dim=TEXT_WIDTH, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_umt5(), vae=tiny_wan22_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer,
                       expand_timesteps=True)
    folder = root / "tiny-wan2.2-ti2v-5b"
    pipe.save_pretrained(folder)
    models = root / "ComfyUI" / "models"
    transformer_file = models / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors"
    files = {
        transformer_file: {f"model.diffusion_model.{k}": v
                           for k, v in native_transformer_state(transformer.state_dict()).items()},
        models / "text_encoders" / "umt5_xxl_fp16.safetensors":
            {k: v.half() for k, v in pipe.text_encoder.state_dict().items()},
        models / "vae" / "wan_2.1_vae.safetensors": dict(tiny_wan_vae().state_dict()),
        models / "vae" / "wan2.2_vae.safetensors": dict(pipe.vae.state_dict()),
    }
    for path, state in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return TinyWan(folder, transformer_file, models)
