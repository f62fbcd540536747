"""FLUX.2 in ComfyUI's layout: the transformer in BFL names (models/diffusion_models, e.g.
flux-2-klein-base-4b.safetensors, flux2_dev_fp8mixed.safetensors), the text encoder (models/text_encoders:
Qwen3's qwen_3_4b / qwen_3_8b for klein, Mistral-Small's mistral_3_small_flux2_bf16 / _fp8 for dev) and
flux2-vae.safetensors (models/vae); configs and the tokenizer from `base_model_config` or the hub.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.families.dit.single_files import (diffusers_named, find_comfy_part, part_config, refuse_file, text_model_from_file,
                                            transformer_from_state, with_fp8_note)
from core.families.dit.weights import comfy_models_root, read_upcast, safetensors_keys
from core.families.flux2.load import (HUB_CONFIGS, Flux2Model, is_distilled_name, is_flux2_keys, load_error,
                                      scheduler_config, streamed, tokenizer_of, variant_from_config)
from core.family_api.contract import ModelLoadError


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL (ComfyUI) transformer names -> diffusers', any prefix; diffusers-named files pass as they are."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return diffusers_named(state, lambda named: "single_stream_modulation.lin.weight" in named,
                           convert_flux2_transformer_checkpoint_to_diffusers)


def find_part(models_root: Path | None, part: str, variant: str, explicit: str = "") -> Path:
    """The text encoder (text_encoders) or the FLUX.2 VAE (vae): given, or found in ComfyUI's folders."""
    qwen = "qwen_3_8b" if variant == "flux2-klein-9b" else "qwen_3_4b"
    text = (("mistral",), "mistral_3_small_flux2", "mistral_3_small_flux2_bf16.safetensors (Mistral-Small 3.1)"
            ) if variant == "flux2-dev" else ((qwen,), qwen, f"{qwen}.safetensors (Qwen3)")
    label = "FLUX.2 dev" if variant == "flux2-dev" else "FLUX.2 klein"
    folders, words, first, hint = {
        "text_encoder": (("text_encoders", "clip"), text[0], text[1], f"{text[2]} in models/text_encoders"),
        "vae": (("vae",), ("flux2", "flux-2"), "flux2", "flux2-vae.safetensors (FLUX.2's autoencoder) in models/vae")}[part]
    return find_comfy_part(models_root, part, explicit, folders=folders, words=words, first=(first,),
                           needs=f"{label} needs {hint}")


def file_shapes(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """The file's own shapes over the config's (a 4B config folder with a 9B file, say)."""
    return {"num_layers": len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")}),
            "num_single_layers": len({k.split(".")[1] for k in state if k.startswith("single_transformer_blocks.")}),
            "num_attention_heads": state["x_embedder.weight"].shape[0] // int(config.get("attention_head_dim", 128)),
            "joint_attention_dim": state["context_embedder.weight"].shape[1],
            "guidance_embeds": any(k.startswith("time_guidance_embed.guidance_embedder.") for k in state)}


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The transformer from a BFL-named (ComfyUI) or diffusers-named single file; fp8 upcast."""
    from diffusers import Flux2Transformer2DModel

    state = native_to_diffusers(read_upcast(path, dtype))
    state = {k: v for k, v in state.items() if not k.startswith(("vae.", "text_encoders.", "first_stage_model."))}
    return transformer_from_state(
        Flux2Transformer2DModel, state, Path(path).name, config_source=config_source, dtype=dtype,
        label="FLUX.2", load_error=load_error,
        hint="Use the transformer file from models/diffusion_models with a config folder of the same FLUX.2 variant.",
        shapes=file_shapes)


# Qwen3 from ComfyUI's file (Qwen3ForCausalLM names, `model.` prefix; the LM head is dropped).
_TEXT_FILES = "klein 4B uses qwen_3_4b, klein 9B qwen_3_8b, dev mistral_3_small_flux2_bf16 (or _fp8)."
load_text_encoder_file = partial(text_model_from_file, label="FLUX.2", load_error=load_error, kind="Qwen3",
                                 use="Use qwen_3_4b.safetensors (klein 4B) or qwen_3_8b.safetensors (klein 9B).",
                                 hint=_TEXT_FILES)
# Mistral-Small from ComfyUI's file: the language model's weights (`model.` prefix); vision tower and LM head,
# when the file has them, are left out.
load_mistral_file = partial(text_model_from_file, label="FLUX.2 dev", load_error=load_error, kind="Mistral-Small",
                            use="Use mistral_3_small_flux2_bf16.safetensors (or _fp8) from models/text_encoders.",
                            hint=_TEXT_FILES, language_model=True)


def load_streamed_mistral_file(path: str | Path, **kw: Any) -> Any:
    return streamed(load_mistral_file(path, **kw))


def vae_state(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An LDM-named (BFL / ComfyUI) FLUX.2 VAE state -> diffusers names; the batch-norm statistics kept."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = {k.removeprefix("vae.").removeprefix("first_stage_model."): v for k, v in state.items()}
    if any(k.startswith("encoder.down_blocks.") for k in state):
        return state
    out = convert_ldm_vae_checkpoint(state, config)
    out.update({k: v for k, v in state.items() if k.startswith("bn.")})
    return out


def load_vae_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    from diffusers import AutoencoderKLFlux2

    config = part_config(AutoencoderKLFlux2, config_source, "vae", load_error)
    try:
        with torch.device("meta"):
            vae = AutoencoderKLFlux2.from_config(config)
        vae.load_state_dict(vae_state(read_upcast(path, dtype), config), strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' is not FLUX.2's autoencoder: {exc}",
                             "FLUX.2 uses flux2-vae.safetensors (32 latent channels), not FLUX.1's ae.") from exc
    return vae.to(dtype).eval()


def load_single_file(transformer_file: str | Path, *, config_source: str = "", text_encoder: str = "",
                     vae: str = "", dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                     text_dtype: torch.dtype | None = None) -> Flux2Model:
    """ComfyUI layout: the transformer file plus its text encoder and the VAE found next to it (or given); dev's
    Mistral in `text_dtype` when given."""
    path = Path(transformer_file)
    refuse_file(path, fits=is_flux2_keys(safetensors_keys(path)), label="FLUX.2", quantization_config=quantization_config,
                use="Use a FLUX.2 transformer file (flux-2-klein-base-4b, flux2-dev) from ComfyUI's models/diffusion_models.")
    from core.families.flux2.load import detect

    variant = detect(str(path)) or "flux2-klein-4b"
    source = config_source or HUB_CONFIGS[variant]
    root = comfy_models_root(path)
    te_file = find_part(root, "text_encoder", variant, text_encoder)
    vae_file = find_part(root, "vae", variant, vae)
    transformer = load_transformer_file(path, config_source=source, dtype=dtype)
    variant = variant_from_config(dict(transformer.config))
    read_text = load_streamed_mistral_file if variant == "flux2-dev" else load_text_encoder_file
    text_dtype = text_dtype if variant == "flux2-dev" and text_dtype is not None else dtype
    encoder = "Mistral-Small" if variant == "flux2-dev" else "Qwen3"
    model = Flux2Model(variant, transformer, load_vae_file(vae_file, config_source=source, dtype=dtype),
                       read_text(te_file, config_source=source, dtype=text_dtype), tokenizer_of(source, variant),
                       distilled=is_distilled_name(path.name), scheduler_config=scheduler_config(source),
                       source=str(path), is_single_file=True, notes=[f"{encoder}: {te_file.name}", f"VAE: {vae_file.name}"])
    return with_fp8_note(model, path, dtype)
