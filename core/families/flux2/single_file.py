"""FLUX.2 klein in ComfyUI's layout: the transformer in BFL names (models/diffusion_models, e.g.
flux-2-klein-base-4b.safetensors), Qwen3's qwen_3_4b.safetensors / qwen_3_8b.safetensors
(models/text_encoders) and flux2-vae.safetensors (models/vae); configs and the tokenizer from
`base_model_config` or the hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.families.dit.weights import (comfy_models_root, config_subfolder, file_has_fp8, fp8_note, local_only,
                                       read_upcast, safetensors_keys)
from core.families.flux2.load import (HUB_CONFIGS, Flux2Model, is_distilled_name, is_flux2_keys, load_error,
                                      scheduler_config, strip, tokenizer_of, variant_from_config)
from core.family_api.contract import ModelLoadError


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL (ComfyUI) transformer names -> diffusers', any prefix; diffusers-named files pass as they are."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    state = {strip(k): v for k, v in state.items()}
    if "single_stream_modulation.lin.weight" not in state:
        return state
    return convert_flux2_transformer_checkpoint_to_diffusers(state)


def find_part(models_root: Path | None, part: str, variant: str, explicit: str = "") -> Path:
    """Qwen3 (text_encoders) or the FLUX.2 VAE (vae): given, or found in ComfyUI's folders."""
    if explicit:
        if not Path(explicit).is_file():
            raise ModelLoadError(f"The {part} file '{explicit}' does not exist.", f"Check the {part} path.")
        return Path(explicit)
    qwen = "qwen_3_8b" if variant == "flux2-klein-9b" else "qwen_3_4b"
    folders, words, first = {"text_encoder": (("text_encoders", "clip"), (qwen,), qwen),
                             "vae": (("vae",), ("flux2", "flux-2"), "flux2")}[part]
    found: list[Path] = []
    for sub in folders if models_root else ():
        if (models_root / sub).is_dir():
            found += sorted(p for p in (models_root / sub).rglob("*.safetensors")
                            if any(w in p.name.lower() for w in words))
    found.sort(key=lambda p: 0 if p.name.lower().startswith(first) else 1)
    if not found:
        hint = {"text_encoder": f"{qwen}.safetensors (Qwen3) in models/text_encoders",
                "vae": "flux2-vae.safetensors (FLUX.2's autoencoder) in models/vae"}[part]
        raise ModelLoadError(f"FLUX.2 klein needs {hint}, and none was found.",
                             "Put the file there, or give its path in the "
                             f"{'text_encoder_files' if part == 'text_encoder' else part} setting.")
    return found[0]


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The transformer from a BFL-named (ComfyUI) or diffusers-named single file; fp8 upcast."""
    from diffusers import Flux2Transformer2DModel

    state = native_to_diffusers(read_upcast(path, dtype))
    state = {k: v for k, v in state.items() if not k.startswith(("vae.", "text_encoders.", "first_stage_model."))}
    try:
        config = dict(Flux2Transformer2DModel.load_config(
            config_source, subfolder=config_subfolder(config_source, "transformer"),
            local_files_only=local_only(config_source)))
    except (OSError, ValueError) as exc:
        raise load_error("transformer config", config_source, exc) from exc
    # The file's own shapes over the config's (a 4B config folder with a 9B file, say).
    config["num_layers"] = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    config["num_single_layers"] = len({k.split(".")[1] for k in state if k.startswith("single_transformer_blocks.")})
    width = state["x_embedder.weight"].shape[0]
    config["num_attention_heads"] = width // int(config.get("attention_head_dim", 128))
    config["joint_attention_dim"] = state["context_embedder.weight"].shape[1]
    config["guidance_embeds"] = any(k.startswith("time_guidance_embed.guidance_embedder.") for k in state)
    try:
        with torch.device("meta"):
            model = Flux2Transformer2DModel.from_config(config)
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit the FLUX.2 config from '{config_source}': {exc}",
                             "Use the transformer file from models/diffusion_models with a FLUX.2 klein config "
                             "folder.") from exc
    return model.to(dtype).eval()


def load_text_encoder_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """Qwen3 from ComfyUI's file (Qwen3ForCausalLM names, `model.` prefix; the LM head is dropped)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(config_source, subfolder="text_encoder",
                                            local_files_only=local_only(config_source))
    except (OSError, ValueError) as exc:
        raise load_error("text encoder config", config_source, exc) from exc
    state = read_upcast(path, dtype)
    marker = "embed_tokens.weight"
    first = next((k for k in state if k.endswith(marker)), None)
    if first is None:
        raise ModelLoadError(f"'{Path(path).name}' is not a Qwen3 text encoder (no {marker}).",
                             "Use qwen_3_4b.safetensors (klein 4B) or qwen_3_8b.safetensors (klein 9B).")
    prefix = first[: -len(marker)]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit FLUX.2's text encoder config: {exc}",
                             "klein 4B uses Qwen3-4B (qwen_3_4b), klein 9B Qwen3-8B (qwen_3_8b).") from exc
    if hasattr(model, "rotary_emb"):  # non-persistent buffers are not in the file: build them for real
        model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.to(dtype).eval()


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

    try:
        config = dict(AutoencoderKLFlux2.load_config(config_source, subfolder=config_subfolder(config_source, "vae"),
                                                     local_files_only=local_only(config_source)))
    except (OSError, ValueError) as exc:
        raise load_error("vae config", config_source, exc) from exc
    try:
        with torch.device("meta"):
            vae = AutoencoderKLFlux2.from_config(config)
        vae.load_state_dict(vae_state(read_upcast(path, dtype), config), strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' is not FLUX.2's autoencoder: {exc}",
                             "FLUX.2 uses flux2-vae.safetensors (32 latent channels), not FLUX.1's ae.") from exc
    return vae.to(dtype).eval()


def load_single_file(transformer_file: str | Path, *, config_source: str = "", text_encoder: str = "",
                     vae: str = "", dtype: torch.dtype = torch.float32, quantization_config: Any = None
                     ) -> Flux2Model:
    """ComfyUI layout: the transformer file plus Qwen3 and the VAE found next to it (or given)."""
    path = Path(transformer_file)
    if not is_flux2_keys(safetensors_keys(path)):
        raise ModelLoadError(f"'{path.name}' is not a FLUX.2 transformer.",
                             "Use flux-2-klein-base-4b.safetensors from ComfyUI's models/diffusion_models.")
    if quantization_config is not None:
        raise ModelLoadError("base_quantization: nf4 needs a diffusers FLUX.2 folder or hub id.",
                             "Give base_model as a diffusers folder, or use fp8_base with the single file.")
    from core.families.flux2.load import detect

    variant = detect(str(path)) or "flux2-klein-4b"
    if variant == "flux2-dev":
        raise ModelLoadError("FLUX.2 dev (Mistral-Small text encoder) is not trainable here yet.",
                             "Train FLUX.2 klein 4B or 9B (base), or FLUX.1-dev.")
    source = config_source or HUB_CONFIGS[variant]
    root = comfy_models_root(path)
    te_file = find_part(root, "text_encoder", variant, text_encoder)
    vae_file = find_part(root, "vae", variant, vae)
    transformer = load_transformer_file(path, config_source=source, dtype=dtype)
    model = Flux2Model(variant_from_config(dict(transformer.config)), transformer,
                       load_vae_file(vae_file, config_source=source, dtype=dtype),
                       load_text_encoder_file(te_file, config_source=source, dtype=dtype), tokenizer_of(source),
                       scheduler_config(source), str(path), distilled=is_distilled_name(path.name),
                       is_single_file=True, notes=[f"Qwen3: {te_file.name}", f"VAE: {vae_file.name}"])
    if file_has_fp8(path):
        model.notes.append(fp8_note(path, dtype))
    return model
