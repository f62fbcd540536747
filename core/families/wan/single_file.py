"""Wan in ComfyUI's layout: the transformer in Wan's native names (models/diffusion_models, bf16 / fp16 / fp8 /
fp8_scaled), UMT5-XXL (models/text_encoders, umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16) and the
Wan VAE (models/vae, wan_2.1_vae.safetensors); configs and the tokenizer from `base_model_config` or the hub.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from core.families.dit.weights import (comfy_models_root, config_subfolder, file_has_fp8, fp8_note, local_only,
                                       read_upcast, safetensors_keys, strip_encoder_prefix, tie_t5_embedding)
from core.families.wan.load import (A14B, BOUNDARY_RATIO, HUB_CONFIGS, WanModel, _pipeline_index, expert_of_name,
                                    is_wan_keys, load_error, scheduler_config, strip_prefix, tokenizer_from,
                                    variant_from_width)
from core.family_api.contract import ModelLoadError

_NOT_TRANSFORMER = ("vae.", "text_encoders.", "first_stage_model.", "conditioner.")


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (ComfyUI / original Wan) transformer names -> diffusers' (any prefix); diffusers names pass."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = {strip_prefix(k): v for k, v in state.items() if not k.startswith(_NOT_TRANSFORMER)}
    if not any(".self_attn." in k for k in state):
        return state
    return convert_wan_transformer_to_diffusers(state)


def find_part(models_root: Path | None, part: str, explicit: str = "") -> Path:
    """UMT5 (text_encoders) or the Wan VAE (vae): given, or found in ComfyUI's folders."""
    if explicit:
        if not Path(explicit).is_file():
            raise ModelLoadError(f"The {part} file '{explicit}' does not exist.", f"Check the {part} path.")
        return Path(explicit)
    folders, words = {"text_encoder": (("text_encoders", "clip"), ("umt5",)), "vae": (("vae",), ("wan",))}[part]
    found: list[Path] = []
    for sub in folders if models_root else ():
        if (models_root / sub).is_dir():
            found += sorted(p for p in (models_root / sub).rglob("*.safetensors")
                            if any(w in p.name.lower() for w in words))
    # Wan 2.1's VAE before Wan 2.2's (the 5B's 48-channel VAE fits only the 5B).
    found.sort(key=lambda p: 0 if "2.2" not in p.name and "2_2" not in p.name else 1)
    if not found:
        hint = {"text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors (UMT5-XXL) in models/text_encoders",
                "vae": "wan_2.1_vae.safetensors in models/vae"}[part]
        setting = "text_encoder_files" if part == "text_encoder" else "vae"
        raise ModelLoadError(f"Wan needs {hint}, and none was found.",
                             f"Put the file there, or give its path in the {setting} setting.")
    return found[0]


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The transformer from a native-named (ComfyUI) or diffusers-named single file; fp8 upcast."""
    from diffusers import WanTransformer3DModel

    state = native_to_diffusers(read_upcast(path, dtype))
    try:
        config = dict(WanTransformer3DModel.load_config(config_source, subfolder=config_subfolder(config_source,
                                                                                                    "transformer"),
                                                        local_files_only=local_only(config_source)))
    except (OSError, ValueError) as exc:
        raise load_error("transformer config", config_source, exc) from exc
    # The file says its shape: width, depth, FFN width, input channels (the config the rest).
    q = state.get("blocks.0.attn1.to_q.weight")
    if q is not None:
        config["num_attention_heads"] = int(q.shape[0]) // int(config.get("attention_head_dim", 128))
        config["num_layers"] = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
        config["ffn_dim"] = int(state["blocks.0.ffn.net.0.proj.weight"].shape[0])
        config["in_channels"] = int(state["patch_embedding.weight"].shape[1])
    try:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config(config)
        model.load_state_dict(state, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit the Wan config from '{config_source}': {exc}",
                             "Use a Wan 2.1 transformer file from models/diffusion_models "
                             "(wan2.1_t2v_1.3B_bf16.safetensors) with a Wan config folder.") from exc
    # Non-persistent buffers (the rotary tables) are not in the file: build them for real.
    model.rope = type(model.rope)(model.config.attention_head_dim, model.config.patch_size,
                                  model.config.rope_max_seq_len)
    return model.to(dtype).eval()


def load_text_encoder_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """UMT5-XXL's encoder from ComfyUI's umt5 file (HF names; fp8 / fp8_scaled upcast)."""
    from transformers import AutoConfig, UMT5EncoderModel

    try:
        config = AutoConfig.from_pretrained(config_source, subfolder="text_encoder",
                                            local_files_only=local_only(config_source))
    except (OSError, ValueError) as exc:
        raise load_error("text encoder config", config_source, exc) from exc
    state = strip_encoder_prefix(read_upcast(path, dtype), "encoder.")
    state = tie_t5_embedding({k: v for k, v in state.items() if k.startswith(("encoder.", "shared."))},
                             Path(path).name)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"'{Path(path).name}' does not fit Wan's UMT5 config: {exc}",
                             "Use umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors "
                             "from ComfyUI's models/text_encoders.") from exc
    return model.to(dtype).eval()


def load_vae_file(path: str | Path, *, config_source: str) -> Any:
    """The Wan VAE from its original single file (wan_2.1_vae.safetensors), in fp32."""
    from diffusers import AutoencoderKLWan

    if "encoder.conv_in.weight" in safetensors_keys(path):  # a VAE file in diffusers' names
        try:
            config = AutoencoderKLWan.load_config(config_source, subfolder=config_subfolder(config_source, "vae"),
                                                  local_files_only=local_only(config_source))
            with torch.device("meta"):
                vae = AutoencoderKLWan.from_config(config)
            vae.load_state_dict(read_upcast(path, torch.float32), strict=True, assign=True)
            return vae.float().eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"'{Path(path).name}' does not fit the Wan VAE config from '{config_source}': {exc}",
                                 "Use wan_2.1_vae.safetensors from ComfyUI's models/vae.") from exc
    try:
        return AutoencoderKLWan.from_single_file(str(path), config=config_source,
                                                 subfolder=config_subfolder(config_source, "vae"),
                                                 torch_dtype=torch.float32, local_files_only=local_only(config_source))
    except OSError as exc:
        raise load_error("vae config", config_source, exc) from exc
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"'{Path(path).name}' is not Wan 2.1's VAE: {exc}",
                             "Use wan_2.1_vae.safetensors from ComfyUI's models/vae.") from exc


def load_single_file(transformer_file: str | Path, *, config_source: str = "", text_encoder: str = "",
                     vae: str = "", dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> WanModel:
    """ComfyUI layout: the transformer file plus UMT5 and the Wan VAE found next to it (or given)."""
    path = Path(transformer_file)
    if not is_wan_keys(safetensors_keys(path)):
        raise ModelLoadError(f"'{path.name}' is not a Wan transformer.",
                             "Use wan2.1_t2v_1.3B_bf16.safetensors (or the 14B) from ComfyUI's models/diffusion_models.")
    if quantization_config is not None:
        raise ModelLoadError("base_quantization: nf4 needs a diffusers Wan folder or hub id.",
                             "Give base_model as a diffusers folder, or use fp8_base with the single file.")
    root = comfy_models_root(path)
    te_file = find_part(root, "text_encoder", text_encoder)
    vae_file = find_part(root, "vae", vae)
    expert = expert_of_name(path.name)  # Wan 2.2 A14B: ComfyUI's high_noise / low_noise files
    transformer = load_transformer_file(path, config_source=config_source or HUB_CONFIGS["wan2.1-t2v-1.3b"],
                                        dtype=dtype)
    variant = A14B if expert else variant_from_width(transformer.config.num_attention_heads
                                                     * transformer.config.attention_head_dim)
    source = config_source or HUB_CONFIGS[variant]
    model = WanModel(variant, transformer, load_vae_file(vae_file, config_source=source),
                     load_text_encoder_file(te_file, config_source=source, dtype=dtype), tokenizer_from(source),
                     scheduler_config(source), str(path), is_single_file=True,
                     notes=[f"UMT5: {te_file.name}", f"VAE: {vae_file.name}"])
    if expert:
        model.expert = expert
        model.boundary_ratio = float((_pipeline_index(source) or {}).get("boundary_ratio") or BOUNDARY_RATIO)
        sibling = path.with_name(re.sub("high_noise|low_noise", lambda m: {"high_noise": "low_noise",
                                                                          "low_noise": "high_noise"}[m[0]], path.name))
        if sibling.is_file():  # the other expert, frozen, for the previews
            model.other_expert = load_transformer_file(sibling, config_source=source, dtype=dtype)
        model.notes.append(f"Wan 2.2 A14B: training the {expert}-noise expert ({path.name}), boundary "
                           f"{model.boundary_ratio:g}" + ("" if sibling.is_file() else
                                                          f"; {sibling.name} is not beside it, so the previews "
                                                          "run this expert alone"))
    if file_has_fp8(path):
        model.notes.append(fp8_note(path, dtype))
    return model
