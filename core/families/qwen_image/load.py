"""Qwen-Image / Qwen-Image-Edit: detection, loading, latents and the LoRA targets (prompts: `text`, the loss: `loss`).

Facts (diffusers 0.42 `QwenImagePipeline` / `QwenImageEditPipeline`, `QwenImageTransformer2DModel`,
`AutoencoderKLQwenImage`):
- the text encoder is Qwen2.5-VL-7B; a prompt goes through a chat template and the hidden states of
  its last layer are kept without the template's first 34 tokens (Edit: 64, and the control image is
  given to the VL model through its processor); padding is masked (`encoder_hidden_states_mask`);
- the VAE is a video VAE: input [B, 3, T, H, W] (T = 1 for an image), 16 latent channels, 8x down;
  latents are normalized per channel by `latents_mean` / `latents_std` (no scaling_factor);
- the transformer sees 2x2 latent patches ("packed", as FLUX) with `img_shapes` [(1, h/2, w/2)] for
  the RoPE; Edit appends the control image's packed latents to the sequence (one more img_shapes
  entry) and keeps only the first part of the output;
- `timestep` is sigma in [0, 1]; the scheduler uses dynamic shifting: shift = exp(mu), mu linear in
  the image's token count (0.5 at 256 tokens, 0.9 at 8192).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.families.dit.default import LoadedModel

# The Qwen-Image VAE's latents live in the toolbox (Krea 2 has the same VAE); re-exported for this family.
from core.families.dit.video_vae import decode_latents, denormalize_latents, encode_moments, normalize_latents  # noqa: F401
from core.families.dit.weights import read_json
from core.hub import offline

# Qwen-Image-Edit-2509 / 2511 (QwenImageEditPlusPipeline) read 1..N images: each through the VL encoder as
# "Picture k: <vision tokens>" before the instruction, each one's latents appended with its own img_shapes entry.
# 2511's transformer config sets zero_cond_t (the reference tokens modulated at t = 0); the weights' names are
# 2509's, so a single file is told apart by its name only (else `base_model_config` names the variant).
EDIT_PLUS = ("qwen-image-edit-2509", "qwen-image-edit-2511")
VARIANTS = ("qwen-image", "qwen-image-edit", *EDIT_PLUS)
HUB_CONFIGS = {"qwen-image": "Qwen/Qwen-Image", "qwen-image-edit": "Qwen/Qwen-Image-Edit",
               "qwen-image-edit-2509": "Qwen/Qwen-Image-Edit-2509", "qwen-image-edit-2511": "Qwen/Qwen-Image-Edit-2511"}
PIPELINE_CLASSES = {"qwen-image": "QwenImagePipeline", "qwen-image-edit": "QwenImageEditPipeline",
                    "qwen-image-edit-2509": "QwenImageEditPlusPipeline",
                    "qwen-image-edit-2511": "QwenImageEditPlusPipeline"}
_EDIT_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                "objects, background), then explain how the user's text instruction should alter or modify the "
                "image. Generate a new image that meets the user's requirements while maintaining consistency with "
                "the original input where appropriate.<|im_end|>\n")
# The pipelines' prompt templates and how many template tokens they drop (checked against diffusers in tests).
PROMPT_TEMPLATE = {
    "qwen-image": "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                  "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                  "<|im_end|>\n<|im_start|>assistant\n",
    "qwen-image-edit": _EDIT_SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
                                      "<|im_start|>assistant\n",
    # Edit Plus: "{}" takes "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: ..." + the prompt.
    **{v: _EDIT_SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n" for v in EDIT_PLUS},
}
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # one per reference image (Edit Plus)
TEMPLATE_DROP = {"qwen-image": 34, "qwen-image-edit": 64, **{v: 64 for v in EDIT_PLUS}}
# The VL encoder's view of each reference (Edit Plus): about 384 x 384 px, its aspect kept (CONDITION_IMAGE_SIZE).
PLUS_CONDITION_AREA = 384 * 384
MAX_PROMPT_TOKENS = 1024   # the pipelines' tokenizer_max_length (after the dropped template tokens)
TRAIN_PROMPT_TOKENS = 512  # max_sequence_length of the pipelines' __call__, what training keeps too
# FlowMatchEulerDiscreteScheduler of Qwen/Qwen-Image: dynamic shifting between these points.
SHIFT_POINTS = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9}
# LoRA targets inside each QwenImageTransformerBlock: the attention projections (image and text
# streams) and both MLPs; not the modulation Linears (img_mod / txt_mod), as musubi-tuner.
BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                 "txt_mlp.net.0.proj", "txt_mlp.net.2")
# Tensor names (prefix stripped) that mark a Qwen-Image transformer file.
SINGLE_FILE_MARKERS = ("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.txt_mlp.net.0.proj.weight",
                       "txt_norm.weight")


@dataclass
class QwenModel(LoadedModel):
    """The modules of a Qwen-Image (Edit) pipeline plus what training needs to know about them."""

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any | None
    processor: Any | None            # Edit: the Qwen2-VL processor (image + text); None for Qwen-Image
    preview_control: str | None = None  # Edit: the control image the previews edit (the first pair's)

    @property
    def needs_control(self) -> bool:
        return self.variant == "qwen-image-edit"

    @property
    def edit_plus(self) -> bool:
        """Qwen-Image-Edit-2509 / 2511: 1..N reference images per prompt (plain images too)."""
        return self.variant in EDIT_PLUS

    @property
    def edits(self) -> bool:
        return self.needs_control or self.edit_plus


# --- detection ----------------------------------------------------------------------------------------

def strip_prefix(keys: Sequence[str]) -> list[str]:
    out = []
    for key in keys:
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out.append(key)
    return out


def is_qwen_keys(keys: Sequence[str]) -> bool:
    names = set(strip_prefix(keys))
    return all(marker in names for marker in SINGLE_FILE_MARKERS)


def variant_from_name(name: str) -> str:
    lowered = name.lower()
    plus = next((v for v in EDIT_PLUS if "edit" in lowered and v.rsplit("-", 1)[1] in lowered), None)
    return plus or ("qwen-image-edit" if "edit" in lowered else "qwen-image")


def variant_from_folder_configs(index: dict[str, Any] | None, transformer: dict[str, Any] | None,
                                name: str = "") -> str | None:
    names = [str(d.get("_class_name", "")) for d in (index or {}, transformer or {})]
    if names[0] == "QwenImageEditPlusPipeline":
        # 2511's transformer config sets zero_cond_t; a hub id without its transformer config: the id's name.
        if transformer and "zero_cond_t" in transformer:
            return "qwen-image-edit-2511" if transformer["zero_cond_t"] else "qwen-image-edit-2509"
        return "qwen-image-edit-2511" if "2511" in name else "qwen-image-edit-2509"
    if names[0] == "QwenImageEditPipeline":
        return "qwen-image-edit"
    if names[0] == "QwenImagePipeline" or (not names[0] and names[1] == "QwenImageTransformer2DModel"):
        return "qwen-image"
    return None


def detect(base_model: str) -> str | None:
    """"qwen-image" / "qwen-image-edit" for a Qwen-Image single file, diffusers folder or hub id; else None."""
    path = Path(base_model)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                keys = list(handle.keys())
        except Exception:  # noqa: BLE001 - not ours to report: the other families' loaders say what is wrong
            return None
        return variant_from_name(path.name) if is_qwen_keys(keys) else None
    if path.is_dir():
        return variant_from_folder_configs(read_json(path / "model_index.json"),
                                           read_json(path / "transformer" / "config.json"))
    if base_model.lower().endswith(".safetensors") or base_model.count("/") != 1:
        return None
    if "qwen" not in base_model.lower():
        return None
    try:
        from diffusers import DiffusionPipeline

        index = dict(DiffusionPipeline.load_config(base_model, local_files_only=offline()))
    except Exception:  # noqa: BLE001 - an unreachable hub id is reported by the loader
        return variant_from_name(base_model) if "qwen-image" in base_model.lower() else None
    return variant_from_folder_configs(index, None, base_model)


# --- loading ------------------------------------------------------------------------------------------

def load_qwen_model(source: str, *, variant: str | None = None, config_source: str = "", vae: str = "",
                    text_encoder: str = "", dtype: torch.dtype = torch.float32,
                    quantization_config: Any = None) -> QwenModel:
    """A diffusers folder / hub id, or ComfyUI's single transformer file (configs from `config_source`)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    # ComfyUI's Edit, 2509 and 2511 files share every tensor name: a file named neither way takes the variant
    # its configs' folder or hub id names (base_model_config), else its own name's.
    variant = variant or (detect(config_source) if config_source and Path(source).is_file() else None) or detect(source)
    if variant is None:
        raise ValueError(f"'{source}' is not a Qwen-Image model (no QwenImagePipeline folder or transformer file).")
    path = Path(source)
    if path.is_file():
        from core.families.qwen_image.single_file import load_single_file

        return load_single_file(path, variant=variant, config_source=config_source, vae=vae,
                                text_encoder=text_encoder, dtype=dtype, quantization_config=quantization_config)
    local = offline() or path.is_dir()
    kwargs: dict[str, Any] = dict(torch_dtype=dtype, local_files_only=local)
    transformer = QwenImageTransformer2DModel.from_pretrained(source, subfolder="transformer",
                                                              quantization_config=quantization_config, **kwargs)
    model = QwenModel(variant, transformer, AutoencoderKLQwenImage.from_pretrained(source, subfolder="vae", **kwargs),
                      *_load_text_side(source, variant, dtype, local),
                      scheduler_config=_scheduler_config(source, local), source=str(source))
    if vae:
        from core.families.qwen_image.single_file import load_vae_file

        model.vae = load_vae_file(vae, config_source=config_source or source, dtype=dtype)
        model.notes.append(f"VAE from {vae}")
    return model


def _load_text_side(source: str, variant: str, dtype: torch.dtype, local: bool) -> tuple[Any, Any, Any]:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, subfolder="text_encoder", dtype=dtype,
                                                                 local_files_only=local).eval()
    tokenizer = Qwen2Tokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local)
    from core.families.qwen_image.text import load_vl_processor

    processor = load_vl_processor(source, tokenizer, local) if variant != "qwen-image" else None
    return encoder, tokenizer, processor


def _scheduler_config(source: str, local: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", local_files_only=local))
    except (OSError, ValueError):
        return {"use_dynamic_shifting": True, "shift": 1.0, **SHIFT_POINTS}


# --- latents -------------------------------------------------------------------------------------------

def lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Full names of the Linears that get LoRA (12 per block)."""
    names = {name for name, _ in transformer.named_modules()}
    blocks = len(transformer.transformer_blocks)
    return [f"transformer_blocks.{i}.{t}" for i in range(blocks) for t in BLOCK_TARGETS
            if f"transformer_blocks.{i}.{t}" in names]

