"""A tiny Krea 2 pipeline built from small configs with the real classes (diffusers' tests/pipelines/krea2 style).

Transformer width 32 (2 heads of 16, one key/value head, 2 blocks; text-fusion width 16 over 2 tapped layers),
a Qwen3-VL of text width 16 with 2 layers and a one-block vision tower, a 4-channel Qwen-Image VAE with a 4x
downscale and per-channel statistics, a BPE tokenizer with a ChatML template. Saved as a diffusers folder named
`tiny-krea-2-raw` (text_encoder_select_layers (1, 2)) and in ComfyUI's layout (native transformer names under
`model.diffusion_model.`, a Qwen3-VL file in Hugging Face's names, qwen_image_vae in the Wan 2.1 VAE's names).
For tests and `bench/` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import chat_bpe_tokenizer, diffusion_model_names, save_tiny_layouts

TEXT_LAYERS = (1, 2)


@dataclass
class TinyKrea2:
    folder: Path
    comfy_transformer: Path
    comfy_root: Path


def tiny_krea2_transformer(seed: int = 0):
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(seed)
    model = Krea2Transformer2DModel(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=32,
                                    text_hidden_dim=16, num_text_layers=len(TEXT_LAYERS), text_num_attention_heads=2,
                                    text_num_key_value_heads=2, text_intermediate_size=32, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():  # zeros in diffusers (trained values in a real model): small random values instead
        for name, param in model.named_parameters():
            if name.endswith("scale_shift_table") or (name.endswith(".weight") and "norm" in name):
                param.copy_(torch.randn_like(param) * 0.1)
    return model


def tiny_krea2_vae(seed: int = 6):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                                  latents_std=[1.5, 0.8, 1.2, 2.0])


def tiny_qwen3_vl(vocab_size: int, seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "head_dim": 8, "vocab_size": vocab_size, "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
                       "patch_size": 14, "deepstack_visual_indexes": [0]})
    return Qwen3VLModel(config).eval()


_PREFIX = (("img_in.", "first."), ("time_embed.linear_1.", "tmlp.0."), ("time_embed.linear_2.", "tmlp.2."),
           ("time_mod_proj.", "tproj.1."), ("txt_in.norm.weight", "txtmlp.0.scale"), ("txt_in.linear_1.", "txtmlp.1."),
           ("txt_in.linear_2.", "txtmlp.3."), ("text_fusion.", "txtfusion."), ("transformer_blocks.", "blocks."),
           ("final_layer.linear.", "last.linear."), ("final_layer.norm.weight", "last.norm.scale"),
           ("final_layer.scale_shift_table", "last.modulation.lin"))
_BLOCK = ((".attn.to_q.", ".attn.wq."), (".attn.to_k.", ".attn.wk."), (".attn.to_v.", ".attn.wv."),
          (".attn.to_out.0.", ".attn.wo."), (".attn.to_gate.", ".attn.gate."),
          (".attn.norm_q.weight", ".attn.qknorm.qnorm.scale"), (".attn.norm_k.weight", ".attn.qknorm.knorm.scale"),
          (".ff.", ".mlp."), (".norm1.weight", ".prenorm.scale"), (".norm2.weight", ".postnorm.scale"),
          (".scale_shift_table", ".mod.lin"))


def native_transformer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> krea-ai's native names (the inverse of diffusers' convert_krea2_transformer_checkpoint_to_diffusers)."""
    out = {}
    for key, value in state.items():
        new = key
        for ours, theirs in _PREFIX:
            if new.startswith(ours):
                new = theirs + new[len(ours):]
                break
        if new.startswith(("blocks.", "txtfusion.")):
            for ours, theirs in _BLOCK:
                new = new.replace(ours, theirs)
        if new.startswith("blocks.") and new.endswith(".mod.lin"):
            value = value.reshape(-1)  # the original stores a block's six modulation vectors flattened
        out[new] = value
    return out


def build_tiny_krea2(root: Path) -> TinyKrea2:
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    from core.families.dit.video_vae import vae_to_comfy

    tokenizer = chat_bpe_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    pipe = Krea2Pipeline(scheduler=scheduler, vae=tiny_krea2_vae(), text_encoder=tiny_qwen3_vl(len(tokenizer)),
                         tokenizer=tokenizer, transformer=tiny_krea2_transformer(),
                         text_encoder_select_layers=TEXT_LAYERS, is_distilled=False)
    folder, transformer_file, models = save_tiny_layouts(pipe, root, "tiny-krea-2-raw", {
        "diffusion_models/krea2_raw_bf16.safetensors":
            diffusion_model_names(native_transformer_state(pipe.transformer.state_dict())),
        "text_encoders/qwen3_vl_4b.safetensors": {f"model.{k}": v.half() for k, v in pipe.text_encoder.state_dict().items()},
        "vae/qwen_image_vae.safetensors": vae_to_comfy(pipe.vae.state_dict()),
    })
    return TinyKrea2(folder, transformer_file, models)
