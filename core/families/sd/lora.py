"""SD 1.x / 2.x / SDXL LoRA: which UNet and text-encoder modules get adapters, the LoRA file a run
continues from, and writing the results through `core.export` (diffusers + kohya/WebUI formats).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import TrainConfig
from core.export.lycoris import is_lycoris_state
from core.lora import (TEXT_ENCODER_MODULES, UNET_ATTENTION_MODULES, doubled_config, make_lora_config, peft_state,
                       pissa_to_lora)

TE_NAMES = ("text_encoder", "text_encoder_2")
_CONV_PARENT = re.compile(r"^(down_blocks|up_blocks|mid_block)\.(\d+\.)?(resnets|downsamplers|upsamplers)\.")


def conv_module_names(unet: nn.Module) -> list[str]:
    """The UNet convolutions LoCon adapts (as kohya: ResNet blocks and the down/up samplers)."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, nn.Conv2d) and _CONV_PARENT.match(name)]


def add_unet_lora(unet: nn.Module, cfg: TrainConfig) -> Any:
    """Add the LoRA adapter to the UNet (attention projections, plus conv layers when conv_rank > 0)."""
    config = make_lora_config(cfg, UNET_ATTENTION_MODULES,
                              conv_modules=conv_module_names(unet) if cfg.conv_rank > 0 else None)
    unet.add_adapter(config)
    return config


def add_text_encoder_lora(encoder: nn.Module, cfg: TrainConfig, targets: list[str] | None = None) -> Any:
    """Add the LoRA adapter to a CLIP text encoder through PEFT itself.

    Not `encoder.add_adapter`: that goes through transformers' PEFT integration, whose PEFT
    floor moves with each transformers release (5.24 asks for a PEFT that does not exist
    yet), while PEFT's own injection is what that method calls underneath.
    """
    from peft import inject_adapter_in_model

    # The user's target_modules name UNet modules; text encoders keep their own projections.
    config = make_lora_config(dataclasses.replace(cfg, target_modules=list(targets or [])), TEXT_ENCODER_MODULES)
    config.base_model_name_or_path = getattr(encoder, "name_or_path", None)
    inject_adapter_in_model(config, encoder, "default")
    return config


# --- LoRA files we continue from ------------------------------------------------------------

@dataclasses.dataclass
class LoadedLora:
    unet: dict[str, torch.Tensor]
    text_encoders: list[dict[str, torch.Tensor]]
    alphas: dict[str, float]
    rank: int
    alpha: float


def read_lora_file(path: str | Path, family: str) -> LoadedLora:
    """A kohya or diffusers LoRA .safetensors -> PEFT state dicts (to continue training from it)."""
    from core.export import load_lora_as_peft

    file = Path(path)
    try:
        unet, tes, alphas = load_lora_as_peft(file, family)
    except Exception as exc:
        raise ValueError(f"'{file}' is not a readable LoRA .safetensors file: {exc}") from exc
    if not unet:
        raise ValueError(f"'{file.name}' holds no UNet LoRA weights (neither kohya nor diffusers keys).")
    downs = [v for k, v in unet.items() if k.endswith("lora_A.weight")]
    rank = int(downs[0].shape[0]) if downs else 0
    alpha_values = [v for k, v in alphas.items() if k.startswith("unet.")]
    alpha = float(alpha_values[0]) if alpha_values else float(rank)
    return LoadedLora(unet, tes, alphas, rank, alpha)


def module_paths(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({re.sub(r"\.(lora_A|lora_B|lora_magnitude_vector)(\..*)?$", "", k) for k in state})


# --- writing results ------------------------------------------------------------------------

def save_lycoris_file(path: Path, family: str, unet: nn.Module, encoders: list[nn.Module],
                      unet_state: dict[str, torch.Tensor], te_states: list[dict[str, torch.Tensor]],
                      metadata: dict[str, Any], save_dtype: torch.dtype) -> Path:
    """A LoKr / LoHa run's file in LyCORIS key names (WebUI/Forge, ComfyUI). No diffusers file: diffusers
    0.42 loads LoKr only into Z-Image and FLUX.2 pipelines and LoHa nowhere."""
    from core.export.kohya import save_kohya_lora
    from core.export.lycoris import peft_to_lycoris, scales_from_model

    scales = {f"unet.{k}": v for k, v in scales_from_model(unet).items()}
    for te_name, encoder in zip(TE_NAMES, encoders):
        scales.update({f"{te_name}.{k}": v for k, v in scales_from_model(encoder).items()})
    tensors = peft_to_lycoris(unet_state, te_states, family, scales=scales)
    return save_kohya_lora(path, tensors, metadata, dtype=save_dtype)


def alphas_for(unet: nn.Module, encoders: list[nn.Module]) -> dict[str, float]:
    from core.export.kohya import kohya_alphas_from_model

    alphas = {f"unet.{k}": v for k, v in kohya_alphas_from_model(unet).items()}
    for name, encoder in zip(TE_NAMES, encoders):
        alphas.update({f"{name}.{k}": v for k, v in kohya_alphas_from_model(encoder).items()})
    return alphas


def save_lora_outputs(folder: Path, name: str, *, family: str, unet: nn.Module, encoders: list[nn.Module],
                      unet_config: Any, te_configs: list[Any], metadata: dict[str, Any],
                      save_dtype: torch.dtype, diffusers_file: bool = True,
                      pissa_init: list[dict[str, torch.Tensor]] | None = None) -> dict[str, str]:
    """Write <name>.safetensors (kohya/WebUI) and pytorch_lora_weights.safetensors (diffusers).

    `pissa_init`: the initial PEFT states [unet, *encoders] of a PiSSA run, to write a LoRA that
    applies to the unmodified base model.
    """
    from core.export.kohya import peft_to_kohya, save_kohya_lora

    unet_state = peft_state(unet)
    te_states = [peft_state(e) for e in encoders]
    if is_lycoris_state(unet_state):
        return {"kohya": str(save_lycoris_file(folder / f"{name}.safetensors", family, unet, encoders, unet_state,
                                               te_states, metadata, save_dtype))}
    alphas = alphas_for(unet, encoders)
    if pissa_init:
        unet_state = pissa_to_lora(unet_state, pissa_init[0])
        te_states = [pissa_to_lora(s, i) for s, i in zip(te_states, pissa_init[1:])]
        alphas = {k: v * 2 for k, v in alphas.items()}
        unet_config = doubled_config(unet_config)
        te_configs = [doubled_config(c) for c in te_configs]
    kohya = peft_to_kohya(unet_state, te_states, family, alphas=alphas)
    paths = {"kohya": str(save_kohya_lora(folder / f"{name}.safetensors", kohya, metadata, dtype=save_dtype))}
    if diffusers_file:
        from core.export.diffusers_format import save_diffusers_lora

        written = save_diffusers_lora(folder, family, unet_state, te_states, unet_lora_config=unet_config,
                                      text_encoder_lora_configs=te_configs or None, dtype=save_dtype)
        paths["diffusers"] = str(written)
    return paths
