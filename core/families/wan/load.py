"""Wan 2.1 / 2.2 video models: detection, loading a diffusers folder or hub id, and the LoRA targets.

Wan is a video DiT (`WanTransformer3DModel`: patch embedding (1, 2, 2), N blocks of self-attention,
cross-attention to UMT5-XXL's outputs and a GELU feed-forward, adaLN from the time embedding) over a causal
3D VAE (`AutoencoderKLWan`: 8x spatial, 4x temporal, the first frame alone: a clip of 4k+1 frames gives k+1
latent frames). Facts read from diffusers 0.42 (`WanPipeline`):

- Prompt: UMT5's last hidden state of the cleaned prompt, padded to 512 tokens; the real tokens kept and the
  rest set to zero (`_get_t5_prompt_embeds`); no attention mask reaches the transformer.
- The transformer takes latents [B, 16, F, h, w], the timestep sigma * 1000 and predicts the velocity
  noise - x0 (the flow-matching scheduler steps x + (sigma_next - sigma) * v).
- Latents: (z - latents_mean) / latents_std per channel (the VAE config's lists).
- Wan 2.2 A14B has two experts: `transformer` (high noise, t >= boundary_ratio * 1000) and `transformer_2`.

Two layouts: a diffusers folder / hub id (here), or ComfyUI's single files (`single_file`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.families.dit.weights import local_only, read_json, safetensors_keys
from core.family_api.contract import ModelLoadError
from core.hub import offline

# Registry names by (transformer width, whether it takes an image): 1536 is the 1.3B, 5120 the 14B.
T2V_13B, T2V_14B, A14B = "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b"
I2V_14B, I2V_A14B, TI2V_5B = "wan2.1-i2v-14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"
VARIANTS = (T2V_13B, T2V_14B, A14B, I2V_14B, I2V_A14B, TI2V_5B)
HUB_CONFIGS = {T2V_13B: "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", T2V_14B: "Wan-AI/Wan2.1-T2V-14B-Diffusers",
               A14B: "Wan-AI/Wan2.2-T2V-A14B-Diffusers", I2V_14B: "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
               I2V_A14B: "Wan-AI/Wan2.2-I2V-A14B-Diffusers", TI2V_5B: "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}
I2V_CHANNELS = 36  # an image-to-video transformer's input: 16 noisy + 4 mask + 16 condition latent channels
TI2V_CHANNELS = 48  # Wan 2.2 TI2V-5B: its VAE's 48 latent channels (no extra condition channels)
BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's model_index.json: the high-noise expert takes t >= 875
MAX_SEQUENCE_LENGTH = 512
SHIFT = 3.0  # musubi-tuner's discrete_flow_shift for Wan (its docs; the 480p pipelines' flow_shift too)
# Tensor names only a Wan transformer has: native (ComfyUI / original) and diffusers'.
NATIVE_MARKERS = ("blocks.0.cross_attn.q.weight",)
DIFFUSERS_MARKERS = ("blocks.0.attn2.to_q.weight",)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass
class WanModel:
    """The modules of a Wan pipeline and what training needs to know about them."""

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str
    is_single_file: bool = False
    notes: list[str] = field(default_factory=list)
    # Wan 2.2 A14B: the expert in `transformer` ("high" / "low"; "both": the high one, the low one in
    # `other_expert`, both trained), the other one (frozen, for previews; None when a single file's sibling is not
    # there) and the split of the noise levels between them.
    expert: str = ""
    other_expert: Any | None = None
    boundary_ratio: float | None = None
    # Wan 2.1 I2V: the CLIP vision model that encodes the start image (with the prompt, into the cache).
    image_encoder: Any | None = None
    image_processor: Any | None = None
    start_image: Any | None = None  # an I2V run's previews' start image (core.families.wan.family)


# --- detection ---------------------------------------------------------------------------------------

def strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_wan_keys(keys: Any) -> bool:
    names = {strip_prefix(k) for k in keys}
    return any(m in names for m in NATIVE_MARKERS + DIFFUSERS_MARKERS)


def variant_from_width(width: int, in_channels: int = 16, two_experts: bool = False) -> str:
    """The 14B is 5120 wide; the 1.3B (and any smaller Wan, e.g. a test's) trains as the 1.3B. 36 input channels:
    image to video (Wan 2.1 I2V 14B, or Wan 2.2 I2V A14B with two experts)."""
    if in_channels == I2V_CHANNELS:
        return I2V_A14B if two_experts else I2V_14B
    if in_channels == TI2V_CHANNELS:
        return TI2V_5B
    if two_experts:
        return A14B
    return T2V_14B if width >= 5120 else T2V_13B


def variant_of_config(config: Any, two_experts: bool = False) -> str:
    """The variant of a WanTransformer3DModel config (a dict or its FrozenDict)."""
    width = int(config.get("num_attention_heads", 12)) * int(config.get("attention_head_dim", 128))
    return variant_from_width(width, int(config.get("in_channels", 16)), two_experts)


def variant_from_shapes(shapes: dict[str, Any], two_experts: bool = False) -> str | None:
    """The variant from a single file's tensor shapes (names without ComfyUI's prefix), None if not Wan."""
    channels = next((int(list(shapes[k])[1]) for k in ("patch_embedding.weight",) if k in shapes), 16)
    for name in NATIVE_MARKERS + DIFFUSERS_MARKERS:
        if name in shapes:
            return variant_from_width(int(list(shapes[name])[0]), channels, two_experts)
    return None


def is_i2v(variant: str) -> bool:
    """Conditioned on a start image through extra input channels (not TI2V-5B: see `expands_timesteps`)."""
    return variant in (I2V_14B, I2V_A14B)


def expands_timesteps(variant: str) -> bool:
    """Wan 2.2 TI2V-5B: a timestep per token, the start frame's latent kept clean (timestep 0)."""
    return variant == TI2V_5B


def expert_of_name(name: str) -> str:
    """"high" / "low" from a Wan 2.2 A14B file name (ComfyUI's wan2.2_t2v_high_noise_14B_...), "" if it says none."""
    lower = name.lower()
    return "high" if "high_noise" in lower else "low" if "low_noise" in lower else ""


def _has_two_experts(index: dict[str, Any] | None) -> bool:
    entry = (index or {}).get("transformer_2")
    return bool(entry) and entry[0] is not None


def _is_wan_config(*configs: dict[str, Any] | None) -> bool:
    return any(str((c or {}).get("_class_name", "")) in ("WanPipeline", "WanImageToVideoPipeline",
                                                         "WanTransformer3DModel") for c in configs)


def _folder_variant(folder: Path, two_experts: bool = False) -> str:
    config = read_json(folder / "transformer" / "config.json") or read_json(folder / "config.json") or {}
    return variant_of_config(config, two_experts)


def detect(base_model: str) -> str | None:
    """The Wan variant of a single file, diffusers folder or (cached) hub id, else None."""
    path = Path(base_model)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return None
        from core.model_info import safetensors_header

        header = safetensors_header(path)
        return variant_from_shapes({strip_prefix(k): v["shape"] for k, v in header.items()},
                                   bool(expert_of_name(path.name)))
    if path.is_dir():
        index = read_json(path / "model_index.json")
        transformer = read_json(path / "transformer" / "config.json") or read_json(path / "config.json")
        if not _is_wan_config(index, transformer):
            return None
        return _folder_variant(path, _has_two_experts(index))
    if base_model.lower().endswith(".safetensors") or "/" not in base_model:
        return None
    lower = base_model.lower()
    if "wan" in lower:
        if "ti2v" in lower:
            return TI2V_5B
        if "i2v" in lower:
            return I2V_A14B if "a14b" in lower else I2V_14B
        return A14B if "a14b" in lower else T2V_14B if "14b" in lower else T2V_13B
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(base_model, local_files_only=offline()))
    except Exception:  # noqa: BLE001 - not a reachable pipeline: another family's loader reports it
        return None
    return T2V_13B if _is_wan_config(index) else None


# --- loading ------------------------------------------------------------------------------------------

def load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"The Wan {what} could not be loaded from '{source}': {exc}",
        "A single-file Wan needs base_model_config: a diffusers Wan folder (model_index.json, transformer/, "
        "text_encoder/, tokenizer/, vae/, scheduler/ configs; the weights are not needed), or the hub id "
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers downloaded once with internet access.")


def scheduler_config(source: str) -> dict[str, Any]:
    """The flow-matching scheduler of the previews, with Wan's shift (diffusers' Wan folders ship UniPC)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        config = dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler",
                                                                  local_files_only=local_only(source)))
    except (OSError, ValueError):
        config = {}
    shift = float(config.get("flow_shift") or config.get("shift") or SHIFT)
    return {"shift": shift, "use_dynamic_shifting": False, "num_train_timesteps": 1000}


def tokenizer_from(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only(source))
    except (OSError, ValueError) as exc:
        raise load_error("tokenizer", source, exc) from exc


def load_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                expert: str = "high") -> WanModel:
    """A diffusers Wan folder or hub id, component by component, on the CPU (the VAE in fp32); a Wan 2.2 A14B
    folder's `expert` ("high": transformer, "low": transformer_2) becomes the model's transformer."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    kw = {"local_files_only": local_only(source)}
    quant = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        transformer = WanTransformer3DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype,
                                                            **kw, **quant)
        text_encoder = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw).eval()
        vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{source}' is not a loadable Wan diffusers folder or hub id: {exc}",
                             "A diffusers Wan folder has model_index.json and transformer/, text_encoder/, "
                             "tokenizer/, vae/ and scheduler/.") from exc
    index = _pipeline_index(source)
    model = WanModel(variant_of_config(transformer.config, _has_two_experts(index)), transformer, vae, text_encoder,
                     tokenizer_from(source), scheduler_config(source), str(source))
    if transformer.config.image_dim is not None:  # Wan 2.1 I2V: the start image's CLIP ViT-H features
        model.image_encoder, model.image_processor = image_encoder_from(source)
    if _has_two_experts(index):
        second = WanTransformer3DModel.from_pretrained(source, subfolder="transformer_2", torch_dtype=dtype, **kw,
                                                       **quant)
        model.boundary_ratio = float(index.get("boundary_ratio") or BOUNDARY_RATIO)
        model.expert = expert if expert in ("low", "both") else "high"
        if model.expert == "low":
            model.transformer, second = second, model.transformer
        model.other_expert = second
        model.notes.append(expert_note(model, "transformer" if model.expert == "high" else "transformer_2"))
    return model


def expert_note(model: WanModel, which: str) -> str:
    """The log line that says which Wan 2.2 A14B expert(s) train."""
    if model.expert == "both":
        return (f"Wan 2.2 A14B: training both experts (the high-noise one for t >= {model.boundary_ratio:g} x 1000, "
                f"the low-noise one below), a LoRA each")
    return f"Wan 2.2 A14B: training the {model.expert}-noise expert ({which}), boundary {model.boundary_ratio:g}"


def image_encoder_from(source: str) -> tuple[Any, Any]:
    """Wan 2.1 I2V's image encoder (CLIP ViT-H vision) and its processor, from a diffusers folder or hub id."""
    from transformers import CLIPVisionModel

    try:
        encoder = CLIPVisionModel.from_pretrained(source, subfolder="image_encoder", dtype=torch.float32,
                                                  local_files_only=local_only(source)).eval()
    except (OSError, ValueError) as exc:
        raise load_error("image encoder (CLIP vision, image_encoder/ and image_processor/)", source, exc) from exc
    return encoder, image_processor_from(source)


def image_processor_from(source: str) -> Any:
    """Wan 2.1 I2V's CLIP image processor (its image_processor/ config) from a diffusers folder or hub id."""
    from transformers import CLIPImageProcessor

    try:
        return CLIPImageProcessor.from_pretrained(source, subfolder="image_processor",
                                                  local_files_only=local_only(source))
    except (OSError, ValueError) as exc:
        raise load_error("image processor (image_processor/)", source, exc) from exc


def _pipeline_index(source: str) -> dict[str, Any] | None:
    from diffusers import DiffusionPipeline

    if Path(source).is_dir():
        return read_json(Path(source) / "model_index.json")
    try:
        return dict(DiffusionPipeline.load_config(source, local_files_only=local_only(source)))
    except Exception:  # noqa: BLE001 - no index: a one-transformer folder
        return None


def load_model(base_model: str, *, config_source: str = "", text_encoder: str = "", vae: str = "",
               dtype: torch.dtype = torch.float32, quantization_config: Any = None, expert: str = "high") -> WanModel:
    """Any Wan source: a single .safetensors (ComfyUI layout), a diffusers folder or a hub id."""
    from core.families.wan.single_file import find_part, load_single_file, load_vae_file

    if Path(base_model).is_file():
        model = load_single_file(base_model, config_source=config_source, text_encoder=text_encoder, vae=vae,
                                 dtype=dtype, quantization_config=quantization_config, expert=expert)
    elif base_model.lower().endswith(".safetensors"):
        raise ModelLoadError(f"The Wan model file '{base_model}' does not exist.", "Check base_model.")
    else:
        model = load_folder(base_model, dtype=dtype, quantization_config=quantization_config, expert=expert)
        if vae:
            model.vae = load_vae_file(find_part(None, "vae", vae), config_source=config_source or base_model)
            model.notes.append(f"VAE from {vae}")
    if expert == "both" and model.expert != "both":
        model.notes.append("wan_expert: both is for a Wan 2.2 A14B model (two experts); this one has one transformer, "
                           "which trains as usual")
    if is_i2v(model.variant):
        from core.families.wan.i2v import mark_vae

        mark_vae(model.vae)  # its latents carry each clip's first-frame condition (core.families.wan.i2v)
        model.notes.append("Image to video: each clip is conditioned on its first frame (an image on itself)")
    return model


def file_keys(path: Path) -> list[str]:
    return safetensors_keys(path)


# --- LoRA targets ---------------------------------------------------------------------------------------

# The Linears of a block that get the LoRA (diffusers names): self- and cross-attention q/k/v/out, the FFN.
ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
             "attn2.add_k_proj", "attn2.add_v_proj")  # Wan 2.1 I2V's image keys / values (k_img, v_img)
FFN = ("ffn.net.0.proj", "ffn.net.2")


def lora_targets(transformer: torch.nn.Module, preset: str = "all") -> list[str]:
    """Module paths of the attention (+ feed-forward) Linears of every block (as musubi-tuner's networks.lora_wan)."""
    suffixes = ATTENTION + (FFN if preset != "attention" else ())
    return [name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks.")
            and name.split(".", 2)[-1] in suffixes]
