"""FLUX.2 (klein 4B / 9B, base and distilled; dev): detection, loading, latents and the LoRA targets.

FLUX.2 is an MMDiT (`Flux2Transformer2DModel`): a few double-stream blocks (separate image / text
attention and SwiGLU MLPs) then single-stream blocks whose attention and MLP are one fused
`to_qkv_mlp_proj` in and one `to_out` out (BFL's `linear1` / `linear2`); modulation is shared by all
blocks. Facts read from diffusers 0.42 (`Flux2KleinPipeline`, `Flux2Pipeline`):

- Variants by shape: klein 4B (width 3072, 5 + 20 blocks, Qwen3-4B), klein 9B (width 4096, 8 + 24,
  Qwen3-8B), dev (width 6144, 8 + 48, Mistral-Small-3.1, a guidance embedding). klein comes as "base"
  (undistilled, used with CFG and ~50 steps: the one to train on) and distilled (4 steps, no CFG); the
  shapes are the same and the name (or model_index.json's `is_distilled`) tells them apart.
- Prompt (klein): Qwen's chat template without thinking, padded to 512 tokens, hidden states of
  layers 9, 18 and 27 concatenated per token ([512, 3 x hidden]). dev: Mistral-Small 3.1's chat template with
  BFL's system message, padded to 512, layers 10, 20 and 30 (core.families.flux2.text); its encoder is
  Mistral3's language model alone (the vision tower and LM head are dropped on load), the tokenizer is
  the folder's processor (PixtralProcessor), as the pipeline's.
- Latents: `AutoencoderKLFlux2`'s mode, 2x2-patchified to 4C channels, normalized by the VAE's batch
  norm statistics (`vae.bn.running_mean / running_var`), packed to [B, h*w, 4C] with 4-D position ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.families.dit import folders
from core.families.dit.default import LoadedModel
from core.families.dit.folders import config_source_hint, part_error
from core.families.dit.single_files import has_marker, strip_model_prefix
from core.families.dit.weights import detect_source, read_json
from core.family_api.contract import ModelLoadError
from core.hub import offline

VARIANTS = ("flux2-klein-4b", "flux2-klein-9b", "flux2-dev")
HUB_CONFIGS = {"flux2-klein-4b": "black-forest-labs/FLUX.2-klein-base-4B",
               "flux2-klein-9b": "black-forest-labs/FLUX.2-klein-base-9B",
               "flux2-dev": "black-forest-labs/FLUX.2-dev"}
# The real networks' shapes: (width, double blocks, single blocks, text width).
SHAPES = {"flux2-klein-4b": (3072, 5, 20, 7680), "flux2-klein-9b": (4096, 8, 24, 12288),
          "flux2-dev": (6144, 8, 48, 15360)}
MAX_SEQUENCE_LENGTH = 512
TEXT_LAYERS = (9, 18, 27)
DEV_TEXT_LAYERS = (10, 20, 30)
# BFL (ComfyUI) tensor names only a FLUX.2 transformer has (FLUX.1 has per-block modulation instead).
NATIVE_MARKERS = ("single_stream_modulation.lin.weight",)
DIFFUSERS_MARKERS = ("single_stream_modulation.linear.weight",)
# LoRA targets in a block: the double blocks' attention and MLPs, the single blocks' fused linears.
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
          "ff_context.linear_out")
SINGLE = ("attn.to_qkv_mlp_proj", "attn.to_out")


@dataclass
class Flux2Model(LoadedModel):
    """The modules of a FLUX.2 pipeline and what training needs to know about them."""

    variant: str
    transformer: Any
    vae: Any
    text_encoder: Any | None
    tokenizer: Any
    distilled: bool = False


# --- detection ---------------------------------------------------------------------------------------

strip = strip_model_prefix


def is_flux2_keys(keys: Any) -> bool:
    return has_marker(keys, NATIVE_MARKERS + DIFFUSERS_MARKERS)


def variant_from_width(width: int, guidance: bool = False) -> str:
    """The variant of a transformer by its width (dev also by its guidance embedding)."""
    if guidance or width >= 6144:
        return "flux2-dev"
    return "flux2-klein-9b" if width >= 4096 else "flux2-klein-4b"


def variant_from_config(config: dict[str, Any]) -> str:
    width = int(config.get("num_attention_heads", 48)) * int(config.get("attention_head_dim", 128))
    return variant_from_width(width, bool(config.get("guidance_embeds", False)))


def variant_from_name(name: str) -> str | None:
    low = name.lower()
    if "klein" in low:
        return "flux2-klein-9b" if "9b" in low else "flux2-klein-4b"
    if any(w in low for w in ("flux.2-dev", "flux2-dev", "flux-2-dev", "flux2_dev")):
        return "flux2-dev"
    return None


def is_distilled_name(name: str) -> bool:
    """klein without "base" in its name is the step-distilled model (BFL's naming); dev is guidance-distilled."""
    low = name.lower()
    return "klein" in low and "base" not in low


def _width_of_file(path: Path) -> tuple[int, bool]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            if strip(key) in ("img_in.weight", "x_embedder.weight"):
                guidance = any("guidance_in" in k or "guidance_embedder" in k for k in keys)
                return int(handle.get_slice(key).get_shape()[0]), guidance
    return 0, False


def _file_variant(path: Path) -> str:
    width, guidance = _width_of_file(path)
    return variant_from_width(width, guidance)


def _folder_variant(path: Path, index: dict[str, Any], transformer: dict[str, Any]) -> str | None:
    if "Flux2" not in str(index.get("_class_name", "")) + str(transformer.get("_class_name", "")):
        return None
    return variant_from_config(transformer) if transformer else (variant_from_name(path.name) or "flux2-klein-4b")


def detect(base_model: str) -> str | None:
    """The FLUX.2 variant of a transformer file, diffusers folder or hub id, else None."""
    return detect_source(base_model, fits=is_flux2_keys, file_variant=_file_variant, folder_variant=_folder_variant,
                         hub_variant=_hub_variant)


def _hub_variant(base_model: str) -> str | None:
    named = variant_from_name(base_model)
    if named:
        return named
    if "flux.2" not in base_model.lower() and "flux2" not in base_model.lower():
        return None
    from diffusers import Flux2Transformer2DModel

    try:
        config = dict(Flux2Transformer2DModel.load_config(base_model, subfolder="transformer",
                                                          local_files_only=offline()))
    except Exception:  # noqa: BLE001 - not reachable: another family's loader reports it
        return None
    return variant_from_config(config)


# --- latents -------------------------------------------------------------------------------------------
# Flux2KleinPipeline's own static helpers, used as they are so the layout is exactly the pipeline's.

def _pipe() -> Any:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def patchify(latents: torch.Tensor) -> torch.Tensor:
    return _pipe()._patchify_latents(latents)  # noqa: SLF001 - the pipeline's exact layout


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    return _pipe()._unpatchify_latents(latents)  # noqa: SLF001


def latent_ids(latents: torch.Tensor) -> torch.Tensor:
    return _pipe()._prepare_latent_ids(latents)  # noqa: SLF001


def text_ids(embeds: torch.Tensor) -> torch.Tensor:
    return _pipe()._prepare_text_ids(embeds)  # noqa: SLF001


def pack(latents: torch.Tensor) -> torch.Tensor:
    return _pipe()._pack_latents(latents)  # noqa: SLF001


def unpack(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return _pipe()._unpack_latents_with_ids(tokens, ids)  # noqa: SLF001


def bn_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def encode_moments(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels -> [mean, logvar] of what the transformer trains on: the VAE's mode, 2x2-patchified and
    batch-norm normalized (as `Flux2KleinPipeline._encode_vae_image` and the reference trainer). The logvar
    is the floor, so the latent cache's sampling gives the mode, as the reference trainer uses."""
    param = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
        latents = patchify(latents.float())
        mean, std = bn_stats(vae, latents)
        latents = (latents - mean) / std
    return torch.cat([latents, torch.full_like(latents, -30.0)], dim=1)


def normalize_latents(vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    return latents  # `encode_moments` already normalized them


def decode_latents(vae: Any, latents: torch.Tensor) -> list[Any]:
    """Normalized patchified latents [B, 4C, h, w] -> PIL images (fp32 decode)."""
    from PIL import Image

    vae_param = next(vae.parameters())
    latents = latents.to(vae_param.device, torch.float32)
    mean, std = bn_stats(vae, latents)
    raw = unpatchify(latents * std + mean)
    with torch.no_grad():
        pixels = vae.to(torch.float32).decode(raw, return_dict=False)[0]
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


# --- loading ------------------------------------------------------------------------------------------

def load_error(what: str, source: str, exc: Exception) -> ModelLoadError:
    hub = HUB_CONFIGS["flux2-dev" if "dev" in Path(source).name.lower() else "flux2-klein-4b"]
    return part_error("FLUX.2", what, source, exc, config_source_hint("FLUX.2", hub))


def scheduler_config(source: str) -> dict[str, Any]:
    return folders.scheduler_config(source, {"shift": 3.0, "use_dynamic_shifting": True})


def tokenizer_of(source: str, variant: str = "flux2-klein-4b") -> Any:
    """klein: the folder's tokenizer; dev: its processor (Flux2Pipeline calls the processor's chat template), or
    where the processor cannot be built (PixtralProcessor needs torchvision, which this app does not install) its
    tokenizer, whose chat template renders a text prompt to the same tokens."""
    if variant != "flux2-dev":
        return folders.tokenizer_of(source, load_error)
    from transformers import AutoProcessor

    from core.families.dit.weights import local_only

    try:
        return AutoProcessor.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only(source))
    except ImportError:
        return folders.tokenizer_of(source, load_error)
    except (OSError, ValueError) as exc:
        raise load_error("tokenizer", source, exc) from exc


def distilled_of(source: str) -> bool:
    """model_index.json's `is_distilled` when it says, else the name."""
    index = read_json(Path(source) / "model_index.json") if Path(source).is_dir() else None
    if index and "is_distilled" in index:
        return bool(index["is_distilled"])
    return is_distilled_name(Path(source).name if Path(source).is_dir() else source)


def mistral_language_model(model: Any) -> Any:
    """Mistral3's language model (MistralModel) out of the multimodal one: what encodes a prompt; the vision tower,
    projector and LM head (about a billion weights) are dropped."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def streamed(language_model: Any) -> Any:
    """dev's MistralModel running a layer at a time on the device (46 GB in bf16: more than a 24 GB card)."""
    from core.families.dit.streamed_encoder import stream_layers

    return stream_layers(language_model, language_model.layers)


@dataclass
class TextEncoder:
    """`from_pretrained` of a FLUX.2 folder's text_encoder/: klein's Qwen3 base model (Qwen3Model, the pipeline's
    Qwen3ForCausalLM less its LM head), dev's Mistral3 as its language model alone, in `dev_dtype` when given
    (46 GB in bf16: loading it in fp32 first would need twice that in CPU memory)."""

    dev_dtype: torch.dtype | None = None

    def from_pretrained(self, source: str, *, subfolder: str, **kw: Any) -> Any:
        from transformers import AutoConfig, AutoModel, Mistral3ForConditionalGeneration

        config = AutoConfig.from_pretrained(source, subfolder=subfolder, local_files_only=kw.get("local_files_only", False))
        if config.model_type == "mistral3":
            if self.dev_dtype is not None:
                kw["dtype"] = self.dev_dtype
            return streamed(mistral_language_model(Mistral3ForConditionalGeneration.from_pretrained(
                source, subfolder=subfolder, **kw)))
        return AutoModel.from_pretrained(source, subfolder=subfolder, **kw)


def load_folder(source: str, *, dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                text_dtype: torch.dtype | None = None) -> Flux2Model:
    """A diffusers FLUX.2 folder or hub id (klein or dev), component by component, on the CPU; dev's Mistral in
    `text_dtype` when given."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    transformer, text_encoder, vae = folders.load_parts(
        source, "FLUX.2", dtype=dtype, quantization_config=quantization_config, transformer=Flux2Transformer2DModel,
        text_encoder=TextEncoder(text_dtype), vae=AutoencoderKLFlux2)
    variant = variant_from_config(dict(transformer.config))
    return Flux2Model(variant, transformer, vae, text_encoder, tokenizer_of(source, variant),
                      distilled=distilled_of(source), scheduler_config=scheduler_config(source), source=str(source))


# Any FLUX.2 source: a single .safetensors (ComfyUI layout), a diffusers folder or a hub id.
load_model = folders.source_loader(load_folder, "core.families.flux2.single_file")


def load_for_training(cfg: Any, *, dtype: torch.dtype, quantization_config: Any) -> Flux2Model:
    """The family's `load`: as every family's (core.families.dit.default.model_loader), with dev's Mistral loaded
    straight in the run's compute dtype (the trainer would cast it to that before encoding anyway)."""
    from core.devices import torch_dtype
    from core.families.dit.common import first_text_encoder_file

    text_dtype = torch_dtype(cfg.mixed_precision) if cfg.mixed_precision != "no" else None
    return load_model(cfg.base_model, config_source=cfg.base_model_config, text_encoder=first_text_encoder_file(cfg),
                      vae=cfg.vae, dtype=dtype, quantization_config=quantization_config, text_dtype=text_dtype)


def lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Module paths of the double blocks' attention + MLP Linears and the single blocks' fused linears."""
    out = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        scope, _, rest = name.partition(".")
        inner = rest.partition(".")[2]
        if (scope == "transformer_blocks" and inner in DOUBLE) or (scope == "single_transformer_blocks"
                                                                   and inner in SINGLE):
            out.append(name)
    return out
