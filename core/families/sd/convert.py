"""Diffusers <-> original (LDM / SGM) single-file key conversion for Stable Diffusion.

diffusers reads single files itself (`from_single_file`); what it lacks in the package is
the other direction, which we need to write WebUI-loadable checkpoints (the LoRA merge
tool) and the tiny single-file checkpoints the tests load. The UNet mapping is derived
from the model's config (blocks, layers per block, which blocks have attention), so it
works for SD 1.x, 2.x, SDXL and the tiny test models alike.

Layout written (what WebUI, ComfyUI and diffusers' own reader expect):
  SD 1.x  model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.text_model.*
  SD 2.x  ... cond_stage_model.model.* (OpenCLIP: fused in_proj, resblocks)
  SDXL    ... conditioner.embedders.0.transformer.text_model.* (CLIP-L),
              conditioner.embedders.1.model.* (OpenCLIP-G)
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET_RENAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                   ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                   ("conv_shortcut", "skip_connection")]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}


def unet_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet2DConditionModel config."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = int(config["layers_per_block"]) if isinstance(config["layers_per_block"], int) else \
        int(config["layers_per_block"][0])
    pairs: list[tuple[str, str]] = []
    for i, kind in enumerate(down_types):
        for j in range(layers):
            ldm = 1 + i * (layers + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0."))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1."))
        if i < len(down_types) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
    for i, kind in enumerate(up_types):
        has_attn = "CrossAttn" in kind
        for j in range(layers + 1):
            ldm = i * (layers + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0."))
            if has_attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1."))
        if i < len(up_types) - 1:
            ldm = i * (layers + 1) + layers
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{ldm}.{2 if has_attn else 1}."))
    pairs.append(("mid_block.resnets.0.", "middle_block.0."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs.append(("mid_block.resnets.1.", "middle_block.2."))
    return pairs


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict -> LDM keys (without the model.diffusion_model. prefix)."""
    pairs = unet_prefix_map(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = None
        for hf, ldm in _UNET_TOP.items():
            if key.startswith(hf + "."):
                new = ldm + key[len(hf):]
                break
        if new is None:
            for hf, ldm in pairs:
                if key.startswith(hf):
                    rest = key[len(hf):]
                    if ".resnets." in hf:
                        for a, b in _RESNET_RENAMES:
                            rest = rest.replace(a, b)
                    new = ldm + rest
                    break
        if new is None:
            raise KeyError(f"UNet key {key!r} has no LDM name; the UNet layout is not a Stable Diffusion one.")
        out[new] = value
    return out


# --- VAE ------------------------------------------------------------------------------------

_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
             ("to_out.0.", "proj_out.")]


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> LDM keys (without first_stage_model.)."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            new = ".".join([parts[0], "down", parts[2]] + parts[3:])
            new = new.replace(".resnets.", ".block.").replace(".downsamplers.0.", ".downsample.")
        elif parts[1] == "up_blocks":
            block = num_up - 1 - int(parts[2])
            new = ".".join([parts[0], "up", str(block)] + parts[3:])
            new = new.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}"] + parts[4:])
            else:  # attentions.0
                rest = ".".join(parts[4:])
                for a, b in _VAE_ATTN:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                new = f"{parts[0]}.mid.attn_1.{rest}"
                if value.ndim == 2:  # linear -> 1x1 conv, as the original VAE stores it
                    value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return out


# --- text encoders --------------------------------------------------------------------------

def _strip_text_model(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); accept both.
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> `<prefix>text_model.*` (SD 1.x and SDXL's first encoder)."""
    return {f"{prefix}text_model.{k}": v for k, v in _strip_text_model(state).items()
            if not k.startswith("text_projection")}


def open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model (with projection for SDXL) -> OpenCLIP keys under `prefix`."""
    flat = _strip_text_model(state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            rest = key[len("encoder.layers."):]
            layer, tail = rest.split(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            if tail.startswith("self_attn.") and tail.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = tail.split(".")
                qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
                continue
            tail = (tail.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1")
                    .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[base + tail] = value
        else:
            raise KeyError(f"text encoder key {key!r} has no OpenCLIP name.")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def pipeline_to_single_file(family: str, *, unet: torch.nn.Module, vae: torch.nn.Module,
                            text_encoders: list[torch.nn.Module],
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict (what a WebUI checkpoint holds)."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in unet_to_ldm(unet.state_dict(), unet.config).items():
        sd[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(vae.state_dict(), vae.config).items():
        sd[VAE_PREFIX + key] = value
    te_states = [te.state_dict() for te in text_encoders]
    if family == "sd1":
        sd.update(clip_to_ldm(te_states[0], "cond_stage_model.transformer."))
    elif family == "sd2":
        sd.update(open_clip_to_ldm(te_states[0], "cond_stage_model.model."))
    elif family == "sdxl":
        sd.update(clip_to_ldm(te_states[0], "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(te_states[1], "conditioner.embedders.1.model."))
    else:
        raise ValueError(f"unknown model family {family!r}; expected sd1, sd2 or sdxl.")
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in sd.items()}
