"""A tiny FLUX.2 klein pipeline built from diffusers' own test config (tests/pipelines/flux2).

Transformer width 32 (2 heads of 16; 1 double and 2 single blocks, no guidance embedding: klein), a
Qwen3 text encoder of width 16 with 27 layers (the pipeline reads hidden states 9, 18 and 27, so the
text width is 48), a 4-channel AutoencoderKLFlux2 with one 2x downscale and batch-norm statistics set
to plain values, a BPE tokenizer with a ChatML template. Saved as a diffusers folder named
`tiny-flux2-klein-base-4b` and in ComfyUI's layout (BFL transformer names with the `model.diffusion_model.`
prefix, qwen_3_4b and flux2-vae files).

FLUX.2 dev (`build_tiny_flux2_dev`): the same transformer with a guidance embedding, a Mistral3 of text width 16
with 30 layers (the pipeline reads hidden states 10, 20 and 30) and a one-layer Pixtral vision tower, and a BPE
tokenizer with a Mistral-style chat template (system prompt, [INST]); saved as `tiny-flux2-dev` and in ComfyUI's
layout (flux2-dev.safetensors, mistral_3_small_flux2_bf16.safetensors with the language model's `model.` names).
For tests and `bench/` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import chat_bpe_tokenizer, diffusion_model_names, save_tiny_layouts


# Mistral-Small's chat template in short: system prompt and instruction markers around the text parts of each message.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{% set text = m['content'] %}{% else %}"
    "{% set text = m['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}{% else %}{{ text }}{% endif %}{% endfor %}")


@dataclass
class TinyFlux2:
    folder: Path              # diffusers folder
    comfy_transformer: Path   # models/diffusion_models/flux-2-klein-base-4b.safetensors (BFL names)
    comfy_root: Path          # the ComfyUI models/ folder


def tiny_flux2_transformer(seed: int = 0, *, guidance_embeds: bool = False):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                   timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)


def tiny_flux2_vae(seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32)
    with torch.no_grad():  # statistics a trained VAE would have, not the identity
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    return vae


def tiny_qwen3_causal(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=27, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=vocab_size, max_position_embeddings=512)
    return Qwen3ForCausalLM(config).eval()


_RENAMES = (("x_embedder.", "img_in."), ("context_embedder.", "txt_in."),
            ("time_guidance_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
            ("time_guidance_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
            ("time_guidance_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
            ("time_guidance_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
            ("double_stream_modulation_img.linear.", "double_stream_modulation_img.lin."),
            ("double_stream_modulation_txt.linear.", "double_stream_modulation_txt.lin."),
            ("single_stream_modulation.linear.", "single_stream_modulation.lin."), ("proj_out.", "final_layer.linear."))
_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
           "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
           "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_out.0.weight": "img_attn.proj.weight",
           "attn.to_add_out.weight": "txt_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
           "ff.linear_out.weight": "img_mlp.2.weight", "ff_context.linear_in.weight": "txt_mlp.0.weight",
           "ff_context.linear_out.weight": "txt_mlp.2.weight"}
_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
           "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def bfl_transformer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> BFL (ComfyUI) names: fused qkv, img/txt_attn, img/txt_mlp, linear1/2, final_layer."""
    from core.families.dit.fused_lora import swap_halves

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        scope, _, rest = key.partition(".")
        if scope == "transformer_blocks":
            n, _, inner = rest.partition(".")
            for parts, native in ((("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv.weight"),
                                  (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv.weight")):
                if inner == f"{parts[0]}.weight":
                    out[f"double_blocks.{n}.{native}"] = torch.cat([state[f"transformer_blocks.{n}.{p}.weight"]
                                                                    for p in parts])
            if inner in _DOUBLE:
                out[f"double_blocks.{n}.{_DOUBLE[inner]}"] = value
            continue
        if scope == "single_transformer_blocks":
            n, _, inner = rest.partition(".")
            out[f"single_blocks.{n}.{_SINGLE[inner]}"] = value
            continue
        if key.startswith("norm_out.linear."):
            out[key.replace("norm_out.linear.", "final_layer.adaLN_modulation.1.")] = swap_halves(value)
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def tiny_mistral3(vocab_size: int, seed: int = 0):
    """Mistral3ForConditionalGeneration: a 30-layer Mistral of width 16 and a one-layer Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 1024, "sliding_window": None},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32, "image_size": 30, "patch_size": 6, "num_channels": 3},
        image_token_index=1, vision_feature_layer=-1, spatial_merge_size=1)
    return Mistral3ForConditionalGeneration(config).eval()


def build_tiny_flux2_dev(root: Path) -> TinyFlux2:
    """A tiny FLUX.2 dev: guidance embedding, Mistral3 text encoder (text width 3 x 16 = 48)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    from core.families.sd.convert import vae_to_ldm

    tokenizer = chat_bpe_tokenizer()
    tokenizer.chat_template = MISTRAL_TEMPLATE
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                         vae=tiny_flux2_vae(), text_encoder=tiny_mistral3(len(tokenizer)), tokenizer=tokenizer,
                         transformer=tiny_flux2_transformer(guidance_embeds=True))
    language = pipe.text_encoder.model.language_model.state_dict()
    folder, transformer_file, models = save_tiny_layouts(pipe, root, "tiny-flux2-dev", {
        "diffusion_models/flux2-dev.safetensors":
            diffusion_model_names(bfl_transformer_state(pipe.transformer.state_dict())),
        # ComfyUI's Mistral-Small file: the language model in causal-LM names (`model.` prefix).
        "text_encoders/mistral_3_small_flux2_bf16.safetensors": {f"model.{k}": v.half() for k, v in language.items()},
        "vae/flux2-vae.safetensors": vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
    })
    return TinyFlux2(folder, transformer_file, models)


def build_tiny_flux2(root: Path) -> TinyFlux2:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from core.families.sd.convert import vae_to_ldm

    tokenizer = chat_bpe_tokenizer()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                              vae=tiny_flux2_vae(), text_encoder=tiny_qwen3_causal(len(tokenizer)),
                              tokenizer=tokenizer, transformer=tiny_flux2_transformer(), is_distilled=False)
    folder, transformer_file, models = save_tiny_layouts(pipe, root, "tiny-flux2-klein-base-4b", {
        "diffusion_models/flux-2-klein-base-4b.safetensors":
            diffusion_model_names(bfl_transformer_state(pipe.transformer.state_dict())),
        # ComfyUI's qwen_3_4b file holds Qwen3ForCausalLM names (`model.` prefix).
        "text_encoders/qwen_3_4b.safetensors": {k: v.half() for k, v in pipe.text_encoder.state_dict().items()},
        "vae/flux2-vae.safetensors": vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
    })
    return TinyFlux2(folder, transformer_file, models)
