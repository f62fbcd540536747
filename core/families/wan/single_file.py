"""Wan in ComfyUI's layout: the transformer in Wan's native names (models/diffusion_models, bf16 / fp16 / fp8 /
fp8_scaled), UMT5-XXL (models/text_encoders, umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16) and the
Wan VAE (models/vae, wan_2.1_vae.safetensors); configs and the tokenizer from `base_model_config` or the hub.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from core.families.dit.folders import fitting
from core.model_info import safetensors_header
from core.families.dit.single_files import assign_state, find_comfy_part, text_encoder_config, transformer_from_state
from core.families.dit.weights import (comfy_models_root, config_subfolder, file_has_fp8, fp8_note, local_only,
                                       read_upcast, safetensors_keys, strip_encoder_prefix, tie_t5_embedding)
from core.families.wan.load import (BOUNDARY_RATIO, HUB_CONFIGS, WanModel, _pipeline_index, detect, expert_note,
                                    expert_of_name, is_wan_keys, load_error, scheduler_config, strip_prefix,
                                    tokenizer_from, variant_of_config, TI2V_CHANNELS)
from core.family_api.contract import ModelLoadError

_NOT_TRANSFORMER = ("vae.", "text_encoders.", "first_stage_model.", "conditioner.")


def native_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native (ComfyUI / original Wan) transformer names -> diffusers' (any prefix); diffusers names pass."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = {strip_prefix(k): v for k, v in state.items() if not k.startswith(_NOT_TRANSFORMER)}
    if not any(".self_attn." in k for k in state):
        return state
    return convert_wan_transformer_to_diffusers(state)


_PARTS = {"text_encoder": (("text_encoders", "clip"), ("umt5",),
                            "umt5_xxl_fp8_e4m3fn_scaled.safetensors (UMT5-XXL) in models/text_encoders"),
          "vae": (("vae",), ("wan",), "wan_2.1_vae.safetensors in models/vae")}


def find_part(models_root: Path | None, part: str, explicit: str = "", *, wan22_vae: bool = False) -> Path:
    """UMT5 (text_encoders) or the Wan VAE (vae): given, or found in ComfyUI's folders (Wan 2.1's VAE before
    Wan 2.2's: the 5B's 48-channel VAE fits only the 5B, which, `wan22_vae`, takes it first)."""
    folders, words, hint = _PARTS[part]
    if wan22_vae:
        hint = "wan2.2_vae.safetensors (the TI2V-5B's VAE) in models/vae"

    def rank(path: Path) -> int:
        is_22 = "2.2" in path.name or "2_2" in path.name
        return 0 if is_22 == wan22_vae else 1

    return find_comfy_part(models_root, part, explicit, folders=folders, words=words, needs=f"Wan needs {hint}",
                           rank=rank)


def _shapes(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """The file says its shape: width, depth, FFN width, input channels (the config the rest)."""
    q = state.get("blocks.0.attn1.to_q.weight")
    if q is None:
        return {}
    shapes = {"num_attention_heads": int(q.shape[0]) // int(config.get("attention_head_dim", 128)),
              "num_layers": len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")}),
              "ffn_dim": int(state["blocks.0.ffn.net.0.proj.weight"].shape[0]),
              "in_channels": int(state["patch_embedding.weight"].shape[1]),
              "out_channels": int(state["proj_out.weight"].shape[0]) // 4}  # (1, 2, 2) patches
    image = state.get("condition_embedder.image_embedder.norm1.weight")  # Wan 2.1 I2V: CLIP features in
    shapes.update(image_dim=int(image.shape[0]) if image is not None else None,
                  added_kv_proj_dim=int(state["blocks.0.attn2.add_k_proj.weight"].shape[1])
                  if "blocks.0.attn2.add_k_proj.weight" in state else None)
    return shapes


def load_transformer_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """The transformer from a native-named (ComfyUI) or diffusers-named single file; fp8 upcast."""
    from diffusers import WanTransformer3DModel

    state = native_to_diffusers(read_upcast(path, dtype))
    model = transformer_from_state(
        WanTransformer3DModel, state, Path(path).name, config_source=config_source, dtype=dtype, label="Wan",
        load_error=load_error, shapes=_shapes,
        hint="Use a Wan 2.1 transformer file from models/diffusion_models (wan2.1_t2v_1.3B_bf16.safetensors) with a "
             "Wan config folder.")
    # Non-persistent buffers (the rotary tables) are not in the file: build them for real.
    model.rope = type(model.rope)(model.config.attention_head_dim, model.config.patch_size,
                                  model.config.rope_max_seq_len)
    return model.to(dtype).eval()


def load_text_encoder_file(path: str | Path, *, config_source: str, dtype: torch.dtype = torch.float32) -> Any:
    """UMT5-XXL's encoder from ComfyUI's umt5 file (HF names; fp8 / fp8_scaled upcast)."""
    from transformers import UMT5EncoderModel

    config = text_encoder_config(config_source, load_error)
    state = strip_encoder_prefix(read_upcast(path, dtype), "encoder.")
    state = tie_t5_embedding({k: v for k, v in state.items() if k.startswith(("encoder.", "shared."))},
                             Path(path).name)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    assign_state(model, state, Path(path).name, "does not fit Wan's UMT5 config",
                 "Use umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors from ComfyUI's "
                 "models/text_encoders.")
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
    with fitting(Path(path).name, lambda exc: load_error("vae config", config_source, exc), "is not Wan 2.1's VAE",
                 "Use wan_2.1_vae.safetensors from ComfyUI's models/vae."):
        return AutoencoderKLWan.from_single_file(str(path), config=config_source,
                                                 subfolder=config_subfolder(config_source, "vae"),
                                                 torch_dtype=torch.float32, local_files_only=local_only(config_source))


def load_single_file(transformer_file: str | Path, *, config_source: str = "", text_encoder: str = "",
                     vae: str = "", dtype: torch.dtype = torch.float32, quantization_config: Any = None,
                     expert: str = "high") -> WanModel:
    """ComfyUI layout: the transformer file plus UMT5 and the Wan VAE found next to it (or given); a Wan 2.2 A14B
    file names its expert, or with `expert: both` the pair (the file and its high_noise / low_noise sibling)."""
    path = Path(transformer_file)
    if not is_wan_keys(safetensors_keys(path)):
        raise ModelLoadError(f"'{path.name}' is not a Wan transformer.",
                             "Use wan2.1_t2v_1.3B_bf16.safetensors (or the 14B) from ComfyUI's models/diffusion_models.")
    if quantization_config is not None:
        raise ModelLoadError("base_quantization: nf4 needs a diffusers Wan folder or hub id.",
                             "Give base_model as a diffusers folder, or use fp8_base with the single file.")
    root = comfy_models_root(path)
    te_file = find_part(root, "text_encoder", text_encoder)
    # The transformer's input channels say whether it is the TI2V-5B (48: its own VAE).
    header = safetensors_header(path)
    embedding = next((k for k in header if k.endswith("patch_embedding.weight")), None)
    channels = int(header[embedding]["shape"][1]) if embedding else 16
    vae_file = find_part(root, "vae", vae, wan22_vae=channels == TI2V_CHANNELS)
    named = expert_of_name(path.name)  # Wan 2.2 A14B: ComfyUI's high_noise / low_noise files
    sibling = path.with_name(re.sub("high_noise|low_noise", lambda m: {"high_noise": "low_noise",
                                                                      "low_noise": "high_noise"}[m[0]], path.name))
    if named and expert == "both":
        if not sibling.is_file():
            raise ModelLoadError(f"wan_expert: both trains the pair, and {sibling.name} is not beside {path.name}.",
                                 "Put both of ComfyUI's files (high_noise and low_noise) in models/diffusion_models, "
                                 "or train one expert (wan_expert: high or low).")
        if named == "low":  # the high-noise file goes in `transformer`
            path, sibling = sibling, path
    expert = "both" if named and expert == "both" else named
    # Without base_model_config: the hub repo of the variant the file's shapes and name say (an I2V file needs
    # its own config: the image attention's sizes are not all in the file).
    guessed = detect(str(path)) or "wan2.1-t2v-1.3b"
    transformer = load_transformer_file(path, config_source=config_source or HUB_CONFIGS[guessed],
                                        dtype=dtype)
    variant = variant_of_config(transformer.config, bool(expert))
    source = config_source or HUB_CONFIGS[variant]
    model = WanModel(variant, transformer, load_vae_file(vae_file, config_source=source),
                     load_text_encoder_file(te_file, config_source=source, dtype=dtype), tokenizer_from(source),
                     scheduler_config(source), str(path), is_single_file=True,
                     notes=[f"UMT5: {te_file.name}", f"VAE: {vae_file.name}"])
    if transformer.config.image_dim is not None:  # Wan 2.1 I2V: ComfyUI's clip_vision_h, else the config's
        model.image_encoder, model.image_processor, where = image_encoder_for(root, source, dtype)
        model.notes.append(f"image encoder (CLIP vision): {where}")
    if expert:
        model.expert = expert
        model.boundary_ratio = float((_pipeline_index(source) or {}).get("boundary_ratio") or BOUNDARY_RATIO)
        if sibling.is_file():  # the other expert: frozen, for the previews (or trained too: both)
            model.other_expert = load_transformer_file(sibling, config_source=source, dtype=dtype)
        model.notes.append(expert_note(model, path.name) + ("" if sibling.is_file() else
                                                          f"; {sibling.name} is not beside it, so the previews "
                                                          "run this expert alone"))
    if file_has_fp8(path):
        model.notes.append(fp8_note(path, dtype))
    return model


def image_encoder_for(models_root: Path | None, source: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """Wan 2.1 I2V's image encoder, its processor and where it came from: ComfyUI's CLIP ViT-H file
    (models/clip_vision, clip_vision_h.safetensors) with the config's image_encoder/ config, or else the whole
    image_encoder/ of the config folder / hub repo (a download of 1.3 GB the user may already have)."""
    from core.families.wan.load import image_encoder_from, image_processor_from

    folder = models_root / "clip_vision" if models_root else None
    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    named = [f for f in files if "clip_vision_h" in f.name.lower()] or [f for f in files if "vit-h" in f.name.lower()]
    if not named:
        encoder, processor = image_encoder_from(source)
        return encoder, processor, f"from {source}"
    return clip_vision_from_file(named[0], source, dtype), image_processor_from(source), named[0].name


def clip_vision_from_file(path: Path, config_source: str, dtype: torch.dtype) -> Any:
    """A CLIPVisionModel holding ComfyUI's CLIP vision file (transformers' names under `vision_model.`, as ComfyUI's
    own loader reads them; the projection, unused by Wan, is left out), built on the meta device with the config's
    image_encoder/ config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    state = read_upcast(path, dtype)
    prefix = "vision_model."
    if f"{prefix}embeddings.patch_embedding.weight" not in state:
        raise ModelLoadError(f"'{path.name}' is not a CLIP vision file in transformers' names (open_clip's "
                             "'visual.' layout is not read here).",
                             "Use ComfyUI's clip_vision_h.safetensors, or remove it from models/clip_vision to take "
                             "the image encoder from the base_model_config folder.")
    try:
        config = CLIPVisionConfig.from_pretrained(config_source, subfolder="image_encoder",
                                                  local_files_only=local_only(config_source))
    except (OSError, ValueError) as exc:
        raise load_error("image encoder config (image_encoder/config.json)", config_source, exc) from exc
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    # transformers 5's CLIPVisionModel holds the vision tower's modules itself (no `vision_model.` level).
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    assign_state(model, state, path.name, "does not fit Wan 2.1 I2V's CLIP ViT-H image encoder",
                 "Use ComfyUI's clip_vision_h.safetensors.")
    # Non-persistent buffers (the position ids) are not in the file: build them for real.
    embeddings = model.embeddings
    embeddings.position_ids = torch.nn.Buffer(torch.arange(embeddings.num_positions).expand((1, -1)),
                                              persistent=False)
    return model.to(dtype).eval()
