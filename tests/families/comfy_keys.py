"""ComfyUI's LoRA key map (comfy/lora.py: model_lora_keys_unet and model_lora_keys_clip), reimplemented for
any family from its own files: which LoRA module names ComfyUI applies, and to which weight.

- every weight `diffusion_model.<k>.weight` of the network in ComfyUI's single file is reachable as
  `lora_unet_<k with _>` and as `diffusion_model.<k>` (the generic part, for every model);
- a UNet model is also reachable by its diffusers names (`lora_unet_down_blocks_0_...`: ComfyUI's
  `unet_to_diffusers` table), here found by matching the diffusers folder's weights with the single
  file's by value (the tiny models' weights are random, so each matches exactly one);
- text encoders: `<kohya prefix>_<key with _>` for the family's text encoder prefixes (lora_te / lora_te1 ...).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open


def _fingerprint(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def unet_key_map(weights: Iterable[str]) -> dict[str, str]:
    """model_lora_keys_unet's generic loop: each `<k>.weight` of the network (with or without ComfyUI's
    `diffusion_model.` prefix) is reachable as `lora_unet_<k with _>` and as `diffusion_model.<k>`."""
    key_map = {}
    for weight in weights:
        k = weight if weight.startswith("diffusion_model.") else f"diffusion_model.{weight}"
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k
    return key_map


def comfy_lora_key_map(single_file: Path, network_state: dict[str, torch.Tensor] | None = None,
                       text_encoders: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, str]:
    """LoRA module name -> the weight ComfyUI applies it to (names as in ComfyUI's model state dict).

    `network_state`: the diffusers network's weights (UNet families: adds ComfyUI's diffusers names);
    `text_encoders`: kohya prefix -> that text encoder's HF weights.
    """
    native: dict[str, str] = {}  # fingerprint -> diffusion_model.<k>.weight
    with safe_open(str(single_file), "pt") as handle:
        weights = [k for k in handle.keys() if k.removeprefix("model.").startswith("diffusion_model.")]
        key_map = unet_key_map(k.removeprefix("model.") for k in weights)
        if network_state is not None:
            native = {_fingerprint(handle.get_tensor(k)): k.removeprefix("model.") for k in weights
                      if k.endswith(".weight")}
    for name, value in (network_state or {}).items():
        if name.endswith(".weight") and value.dim() >= 2 and _fingerprint(value) in native:
            key_map["lora_unet_" + name[: -len(".weight")].replace(".", "_")] = native[_fingerprint(value)]
    for prefix, state in (text_encoders or {}).items():
        for name in state:
            if name.endswith(".weight"):
                key_map[f"{prefix}_" + name[: -len(".weight")].replace(".", "_")] = f"{prefix}:{name}"
    return key_map


def comfy_load(lora: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict[str, tuple], set[str]]:
    """comfy/lora.py load_lora for plain LoRA modules, in kohya's (lora_up / lora_down) or diffusers'
    (lora_B / lora_A) names: (patches by model key, keys it did not load)."""
    patches, loaded = {}, set()
    for name, target in key_map.items():
        up, down, alpha = f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"
        if up not in lora and f"{name}.lora_B.weight" in lora:
            up, down = f"{name}.lora_B.weight", f"{name}.lora_A.weight"
        if up in lora:
            patches[target] = (lora[up], lora[down], lora[alpha].item() if alpha in lora else None)
            loaded |= {up, down} | ({alpha} if alpha in lora else set())
    return patches, set(lora) - loaded
