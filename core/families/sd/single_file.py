"""Single-file Stable Diffusion checkpoints (the WebUI kind): read, recognise, load.

A `.safetensors` file is read directly; a pickle (`.ckpt` ...) only when the user opted
in with `allow_pickle`, and then only with `torch.load(weights_only=True)`. The family
(sd1 / sd2 / sdxl) and the prediction type come from the keys. Building the diffusers
modules needs the model's configs and tokenizer: from `base_model_config` (a diffusers
folder or hub id), else the standard hub repo of the family (cached or online).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch

from core.hub import offline
from core.family_api.contract import ModelLoadError
from core.family_api.registry import family_info

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")



def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint, with a clear error for damaged or unsafe files."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"The base model file '{file}' does not exist.", "Check base_model.")
    size = file.stat().st_size
    if file.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"'{file.name}' is a pickle file ({file.suffix}), which can run code when loaded.",
                "Use a .safetensors version of the model, or set allow_pickle: true if you trust this file.")
        try:
            # Even with the opt-in, only tensors and plain containers are unpickled: a
            # checkpoint that needs arbitrary Python objects could run code, so it is refused.
            data: Any = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            if "weights_only" in str(exc) or "Unsupported" in str(exc):
                raise ModelLoadError(
                    f"'{file.name}' holds Python objects besides the weights, and loading those could run "
                    "code, so it was not loaded.",
                    "Use the .safetensors version of this model (most models publish one), or convert "
                    "the file to .safetensors with a tool you trust.") from exc
            raise ModelLoadError(f"'{file.name}' could not be read ({size / 2**20:.1f} MB): {exc}",
                                 "The file is damaged or incomplete: download it again.") from exc
        while isinstance(data, dict) and "state_dict" in data:
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise ModelLoadError(f"'{file.name}' holds no state dict.", "Use a Stable Diffusion checkpoint.")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    try:
        from safetensors.torch import load_file

        return load_file(str(file))
    except Exception as exc:
        raise ModelLoadError(
            f"'{file.name}' is not a readable .safetensors file ({size / 2**20:.1f} MB): {exc}",
            "The file is damaged or was not downloaded completely: download it again.") from exc


def detect_family(keys: Mapping[str, Any] | list[str], name: str = "the checkpoint") -> str:
    """sd1 | sd2 | sdxl from a single file's keys; raises ModelLoadError for anything else."""
    keyset = set(keys)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keyset):
        raise ModelLoadError(f"{name} is a LoRA, not a base model.",
                             "Set base_model to a Stable Diffusion checkpoint; use init_lora for a LoRA.")
    if not any(k.startswith("model.diffusion_model.") for k in keyset):
        raise ModelLoadError(f"{name} has no Stable Diffusion UNet (no model.diffusion_model.* keys).",
                             "Use a full SD 1.x / 2.x / SDXL checkpoint, not a VAE or a LoRA.")
    if any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in keyset):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keyset):
        raise ModelLoadError(f"{name} is an SDXL refiner, which is not trained with LoRA here.",
                             "Use the SDXL base model.")
    if any(k.startswith("cond_stage_model.model.") for k in keyset):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keyset):
        return "sd1"
    raise ModelLoadError(f"{name} has a UNet but no text encoder, so its family cannot be told.",
                         "Use a full checkpoint that includes the text encoder.")


def check_supported(checkpoint: Mapping[str, torch.Tensor], name: str) -> None:
    conv_in = checkpoint.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise ModelLoadError(f"{name} is an inpainting/special model ({conv_in.shape[1]} input channels).",
                             "Train LoRAs on a normal (non-inpainting) base model.")


def detect_prediction_type(checkpoint: Mapping[str, Any], family: str, file_name: str) -> str | None:
    """v_prediction / epsilon when the file tells; None when only the config can say."""
    if "v_pred" in checkpoint:  # kohya/SAI marker tensor of v-prediction checkpoints
        return "v_prediction"
    if family == "sd2":
        # SD 2.x 768 models are v-prediction, the 512 "base" ones epsilon; the weights look the same.
        return "epsilon" if re.search(r"base|512", file_name, re.I) else "v_prediction"
    return None


def resolve_config_source(family: str, model_config: str) -> str:
    """Where the diffusers configs + tokenizer for a single file come from."""
    if model_config:
        return model_config
    bundled = Path(__file__).resolve().parent / "configs" / family
    if (bundled / "tokenizer").is_dir():
        return str(bundled)
    return family_info(family).hub_repo  # where its configs and tokenizer live on the hub


def load_single_file_components(path: str | Path, *, family: str, checkpoint: dict[str, torch.Tensor],
                                model_config: str = "") -> dict[str, Any]:
    """unet, vae, text_encoders, tokenizers and scheduler_config built from a checkpoint dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = resolve_config_source(family, model_config)
    local = Path(source).is_dir()
    hub_offline = offline() and not local
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=source, subfolder="unet",
                                                     local_files_only=hub_offline or local)
        vae = AutoencoderKL.from_single_file(checkpoint, config=source, subfolder="vae",
                                             local_files_only=hub_offline or local)
        encoders = [create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder",
                                                         config=source, local_files_only=hub_offline or local)]
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=hub_offline or local)]
        if family == "sdxl":
            encoders.append(create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, checkpoint, subfolder="text_encoder_2", config=source,
                local_files_only=hub_offline or local))
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2",
                                                            local_files_only=hub_offline or local))
        from diffusers import DDPMScheduler

        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler",
                                                          local_files_only=hub_offline or local))
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"Loading '{Path(path).name}' with the configs in '{source}' failed: {exc}",
                                 "base_model_config must be a diffusers folder of the same family "
                                 f"({family}) with unet/, vae/, text_encoder/, tokenizer/ and scheduler/.") from exc
        raise ModelLoadError(
            f"'{Path(path).name}' is a single-file {family} checkpoint; building it needs the model's configs "
            f"and tokenizer ({source} on the Hugging Face hub), which are not in the local cache"
            f"{' and the hub is offline' if offline() else ''}: {exc}",
            "Set base_model_config to a local diffusers folder of the same family (for example a downloaded "
            f"{source}), or run once with internet access so the small config files get cached.") from exc
    for encoder in encoders:
        encoder.eval()
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers,
            "scheduler_config": scheduler_config, "config_source": source}
