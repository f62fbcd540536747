"""Load a Stable Diffusion base model for LoRA training or sampling.

Three kinds of `base_model`: a single-file checkpoint (`.safetensors`, the WebUI kind;
pickles only with allow_pickle), a diffusers folder, or a hub id. Whatever the source,
the result is an `SDModel`: the diffusers modules, the family (sd1 / sd2 / sdxl) and the
prediction type the model was trained with.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from core.hub import offline
from core.family_api.registry import UNET_FAMILIES, family_info
from core.families.sd.single_file import (PICKLE_SUFFIXES, ModelLoadError, check_supported, detect_family,
                                        detect_prediction_type, load_single_file_components, read_checkpoint)

FAMILIES = UNET_FAMILIES


@dataclass
class SDModel:
    """The modules of a Stable Diffusion pipeline plus what training needs to know about them."""

    family: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    prediction_type: str
    source: str
    is_single_file: bool = False
    notes: list[str] = field(default_factory=list)
    # Set when the UNet's load was put off (`unet` None until `load_unet`): training loads it once the
    # VAE and text encoders are cached and gone, so the three are never in memory at once.
    unet_loader: Callable[[], Any] | None = None

    def load_unet(self) -> None:
        if self.unet is None and self.unet_loader is not None:
            self.unet = self.unet_loader()
            self.unet_loader = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return family_info(self.family).native_resolution

    def noise_scheduler(self) -> Any:
        """The DDPM scheduler training adds noise with (the model's betas, our prediction type)."""
        from diffusers import DDPMScheduler

        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        config["prediction_type"] = self.prediction_type
        return DDPMScheduler.from_config(config)


def family_from_diffusers_config(index: dict[str, Any], unet_config: dict[str, Any]) -> str:
    """The family of a diffusers pipeline from model_index.json and the UNet config."""
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def model_family(base_model: str, *, allow_pickle: bool = False) -> str:
    """The family of a base model without loading its weights (single file: reads the header only)."""
    path = Path(base_model)
    if path.is_file():
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), "pt") as handle:
                    keys = list(handle.keys())
            except Exception as exc:
                raise ModelLoadError(f"'{path.name}' is not a readable .safetensors file: {exc}",
                                     "The file is damaged or incomplete: download it again.") from exc
            return detect_family(keys, f"'{path.name}'")
        return detect_family(read_checkpoint(path, allow_pickle=allow_pickle), f"'{path.name}'")
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    local = path.is_dir()
    try:
        index = DiffusionPipeline.load_config(base_model, local_files_only=local or offline())
        unet_config = UNet2DConditionModel.load_config(base_model, subfolder="unet",
                                                       local_files_only=local or offline())
    except (OSError, ValueError) as exc:
        raise _folder_error(base_model, exc) from exc
    return family_from_diffusers_config(dict(index), dict(unet_config))


def _folder_error(base_model: str, exc: Exception) -> ModelLoadError:
    if Path(base_model).is_dir():
        return ModelLoadError(f"'{base_model}' is not a complete diffusers model folder: {exc}",
                              "A diffusers folder has model_index.json and unet/, vae/, text_encoder/, "
                              "tokenizer/, scheduler/ subfolders. Point base_model at such a folder or at a "
                              ".safetensors checkpoint.")
    return ModelLoadError(f"The hub model '{base_model}' could not be loaded{' (offline)' if offline() else ''}: "
                          f"{exc}", "Check the id, download the model once with internet access, or use a "
                          "local file or folder.")


def _load_diffusers(base_model: str, defer_unet: bool = False) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(base_model).is_dir()
    kw = {"local_files_only": local or offline()}
    unet, loader = None, None
    try:
        index = dict(DiffusionPipeline.load_config(base_model, **kw))
        if defer_unet:
            family = family_from_diffusers_config(index, dict(UNet2DConditionModel.load_config(
                base_model, subfolder="unet", **kw)))
            loader = lambda: UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **kw)  # noqa: E731
        else:
            unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **kw)
            family = family_from_diffusers_config(index, dict(unet.config))
        vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae", **kw)
        encoders = [CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", **kw)]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2", **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2", **kw))
        scheduler_config = dict(DDPMScheduler.load_config(base_model, subfolder="scheduler", **kw))
    except (OSError, ValueError) as exc:
        raise _folder_error(base_model, exc) from exc
    for encoder in encoders:
        encoder.eval()
    return {"family": family, "unet": unet, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers,
            "scheduler_config": scheduler_config, "unet_loader": loader}


def load_vae(vae: str, *, config_source: str | None = None) -> Any:
    """A separate VAE: a diffusers folder (with or without vae/), a hub id, or a single file."""
    from diffusers import AutoencoderKL

    path = Path(vae)
    try:
        if path.is_file():
            kw: dict[str, Any] = {"config": config_source, "subfolder": "vae"} if config_source else {}
            return AutoencoderKL.from_single_file(str(path), **kw)
        sub = "vae" if (path / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(vae, subfolder=sub, local_files_only=path.is_dir() or offline())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"The VAE '{vae}' could not be loaded: {exc}",
                             "Use a diffusers VAE folder or a .safetensors VAE, or leave vae empty.") from exc


def load_sd_model(base_model: str, *, allow_pickle: bool = False, vae: str = "", prediction_type: str = "auto",
                  model_config: str = "", defer_unet: bool = False) -> SDModel:
    """Load `base_model` (single file, diffusers folder or hub id) in fp32 on the CPU. `defer_unet`: a
    diffusers folder's UNet is left for `SDModel.load_unet` (a single file is read whole at once)."""
    path = Path(base_model)
    notes: list[str] = []
    single = path.is_file()
    if single:
        checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
        family = detect_family(checkpoint, f"'{path.name}'")
        check_supported(checkpoint, f"'{path.name}'")
        parts = load_single_file_components(path, family=family, checkpoint=checkpoint, model_config=model_config)
        file_pred = detect_prediction_type(checkpoint, family, path.name)
        marker = "v_pred" in checkpoint
        del checkpoint
        config_pred = parts["scheduler_config"].get("prediction_type", "epsilon")
        # The file's own v_pred marker wins; then an explicit config folder; then the family's usual kind.
        if marker:
            auto_pred = "v_prediction"
        elif model_config:
            auto_pred = config_pred
        else:
            auto_pred = file_pred or config_pred
        parts["family"] = family
    else:
        if path.suffix.lower() in PICKLE_SUFFIXES + (".safetensors",) and not path.exists():
            raise ModelLoadError(f"The base model file '{base_model}' does not exist.", "Check base_model.")
        parts = _load_diffusers(base_model, defer_unet)
        auto_pred = parts["scheduler_config"].get("prediction_type", "epsilon")
    pred = auto_pred if prediction_type == "auto" else prediction_type
    if prediction_type == "auto" and pred == "v_prediction":
        notes.append("v-prediction model (prediction_type auto); set prediction_type: epsilon if that is wrong.")
    if vae:
        parts["vae"] = load_vae(vae, config_source=parts.get("config_source"))
        notes.append(f"VAE from {vae}")
    return SDModel(family=parts["family"], unet=parts["unet"], vae=parts["vae"],
                   text_encoders=parts["text_encoders"], tokenizers=parts["tokenizers"],
                   scheduler_config=parts["scheduler_config"], prediction_type=pred or "epsilon",
                   source=str(base_model), is_single_file=single, notes=notes,
                   unet_loader=parts.get("unet_loader"))


