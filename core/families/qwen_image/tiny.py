"""Tiny Qwen-Image and Qwen-Image-Edit pipelines built in code with the real classes.

diffusers' own tiny test configs (tests/pipelines/qwenimage): a 2-block transformer of width 48,
a 4-channel video VAE with 4x down-scaling, a 2-layer Qwen2.5-VL of width 16; the tokenizer is a
byte-level BPE without merges (every byte one token) with Qwen's chat special tokens, so the
templates tokenize offline. Edit adds the Qwen2-VL processor (image processor + that tokenizer).
Each is saved as a diffusers folder, Qwen-Image also in ComfyUI's layout (transformer file in
models/diffusion_models with the `model.diffusion_model.` prefix, text encoder and VAE files).
For tests and `bench/` only (never imported by the app).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.families.tiny_parts import save_state_files

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


@dataclass
class TinyQwen:
    variant: str
    folder: Path
    comfy_transformer: Path | None = None
    comfy_root: Path | None = None


def tiny_qwen_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for token in SPECIAL:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=list(SPECIAL[1:]))
    tok.model_max_length = 32768
    return tok


def tiny_qwen_text_encoder(tokenizer, seed: int = 3):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer) + 2, "bos_token_id": None,
                     "eos_token_id": ids["<|im_end|>"],
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer) + 2, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], image_token_id=ids["<|image_pad|>"],
        vision_token_id=ids["<|image_pad|>"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_vae(seed: int = 6):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                                  latents_std=[1.5, 0.8, 1.2, 2.0])


def tiny_qwen_transformer(seed: int = 7, *, zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4), zero_cond_t=zero_cond_t)


def tiny_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen2-VL's own patching (14 px patches, 2x2 merge), a few patches per image.
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


def edit_pipeline(pipe_or_parts, folder: Path | None = None, *, plus: bool = False):
    """A QwenImageEditPipeline (`plus`: QwenImageEditPlusPipeline, 2509 / 2511) over tiny parts, with our VL
    processor (transformers' needs torchvision)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    from core.families.qwen_image.text import VLProcessor

    parts = {k: v for k, v in dict(pipe_or_parts).items() if k != "processor"}
    kind = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return kind(processor=VLProcessor(tiny_image_processor(), parts["tokenizer"]), **parts)


def write_comfy_layout(pipe, root: Path, name: str) -> tuple[Path, Path]:
    """ComfyUI's layout: models/diffusion_models/<name>.safetensors (prefixed), text_encoders, vae."""

    from core.families.qwen_image.single_file import text_encoder_to_comfy, vae_to_comfy

    models = root / "models"
    files = {
        models / "diffusion_models" / f"{name}.safetensors":
            {f"model.diffusion_model.{k}": v for k, v in pipe.transformer.state_dict().items()},
        models / "text_encoders" / "qwen_2.5_vl_7b.safetensors": text_encoder_to_comfy(pipe.text_encoder.state_dict()),
        models / "vae" / "qwen_image_vae.safetensors": vae_to_comfy(pipe.vae.state_dict()),
    }
    return save_state_files(files), models


def build_tiny_qwen(root: Path, variant: str = "qwen-image", *, comfy: bool = True) -> TinyQwen:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    root = Path(root)
    folder = root / f"tiny-{variant}"
    tokenizer = tiny_qwen_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift=1.0)
    # Edit 2511's transformer modulates the reference tokens at t = 0 (zero_cond_t), 2509's does not.
    parts = dict(scheduler=scheduler, vae=tiny_qwen_vae(), text_encoder=tiny_qwen_text_encoder(tokenizer),
                 tokenizer=tokenizer, transformer=tiny_qwen_transformer(zero_cond_t=variant == "qwen-image-edit-2511"))
    pipe = QwenImagePipeline(**parts)
    pipe.save_pretrained(folder)
    if variant != "qwen-image":
        # The Edit folder: the same parts plus processor/ (image processor + tokenizer), as Qwen/Qwen-Image-Edit.
        tiny_image_processor().save_pretrained(folder / "processor")
        tokenizer.save_pretrained(folder / "processor")
        index = json.loads((folder / "model_index.json").read_text())
        pipeline = "QwenImageEditPipeline" if variant == "qwen-image-edit" else "QwenImageEditPlusPipeline"
        index.update(_class_name=pipeline, processor=["transformers", "Qwen2VLProcessor"])
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if not comfy:
        return TinyQwen(variant, folder)
    transformer_file, models = write_comfy_layout(pipe, root / "ComfyUI", "qwen_image_bf16")
    return TinyQwen(variant, folder, transformer_file, models)
