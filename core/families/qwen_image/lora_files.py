"""Qwen-Image LoRA files (the single model files are in `single_file`).

 ComfyUI maps a Qwen-Image LoRA key to its model by the diffusers module name, accepting
`diffusion_model.<m>`, `<m>`, `transformer.<m>`, `lycoris_<m with _>` and kohya's `lora_unet_<m with _>`
(comfy/lora.py, model_lora_keys_unet). We write musubi-tuner's form, `lora_unet_<m with _>` with
lora_down / lora_up / alpha, and diffusers' `pytorch_lora_weights.safetensors` (`transformer.<m>.lora_A/B`).
"""
from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from core.export.metadata import num_text
from core.families.dit.lora_files import KohyaLayout, diffusers_writer, kohya_file_writer, read_family_lora

KOHYA_PREFIX = "lora_unet_"
# musubi-tuner's sai_model_spec: architecture names and implementation URL.
ARCHITECTURE = {"qwen-image": "Qwen-Image", "qwen-image-edit": "Qwen-Image-Edit",
                "qwen-image-edit-2509": "Qwen-Image-Edit-2509", "qwen-image-edit-2511": "Qwen-Image-Edit-2511"}
IMPLEMENTATION = "https://github.com/QwenLM/Qwen-Image"


# --- LoRA files -----------------------------------------------------------------------------------------

def group_peft(peft_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module path: {"A", "B"}} of a PEFT state dict, `transformer.` / `base_model.model.` prefixes removed."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in peft_state.items():
        name = key.removeprefix("transformer.").removeprefix("base_model.model.")
        m = re.match(r"(.+)\.lora_(A|B)(?:\.default)?\.weight$", name)
        if m:
            modules.setdefault(m.group(1), {})[m.group(2)] = value
    return modules


def kohya_name(module_path: str) -> str:
    return KOHYA_PREFIX + module_path.replace(".", "_")


def module_names(num_layers: int = 60) -> dict[str, str]:
    """{kohya name: diffusers module path} of every LoRA-able Linear of the transformer's blocks."""
    from core.families.qwen_image.load import BLOCK_TARGETS

    mods = [f"transformer_blocks.{i}.{t}" for i in range(num_layers) for t in
            (*BLOCK_TARGETS, "img_mod.1", "txt_mod.1")]
    mods += ["img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2"]
    return {kohya_name(m): m for m in mods}


def _unflatten(flat: str) -> str:
    """`transformer_blocks_3_attn_to_out_0` -> `transformer_blocks.3.attn.to_out.0` (the model's own names)."""
    m = re.match(r"transformer_blocks_(\d+)_(.+)$", flat)
    if m:
        index = int(m.group(1))
        return module_names(index + 1).get(KOHYA_PREFIX + flat, flat)
    return module_names(1).get(KOHYA_PREFIX + flat, flat)


def peft_to_kohya(peft_state: Mapping[str, Tensor], *, alpha: float | Mapping[str, float],
                  use_rslora: bool = False) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for path, parts in group_peft(peft_state).items():
        rank = int(parts["A"].shape[0])
        a = float(alpha[path] if isinstance(alpha, Mapping) else alpha)
        if use_rslora:
            a *= rank ** 0.5  # alpha / sqrt(r) written as alpha' / r
        name = kohya_name(path)
        tensors[f"{name}.lora_down.weight"] = parts["A"]
        tensors[f"{name}.lora_up.weight"] = parts["B"]
        tensors[f"{name}.alpha"] = torch.tensor(a)
    return tensors


def kohya_to_peft(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Any ComfyUI-loadable form (lora_unet_, diffusion_model., transformer., lycoris_, bare) -> PEFT + alphas."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = re.match(r"(.+?)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$", key)
        if not m:
            continue
        name, part = m.groups()
        for prefix, flat in (("lora_unet_", True), ("lycoris_", True), ("diffusion_model.", False),
                             ("transformer.", False), ("", False)):
            if name.startswith(prefix):
                name = name[len(prefix):]
                path = _unflatten(name) if flat else name
                break
        part = {"lora_down.weight": "A", "lora_A.weight": "A", "lora_up.weight": "B", "lora_B.weight": "B"}.get(
            part, "alpha")
        groups.setdefault(path, {})[part] = value
    peft, alphas = {}, {}
    for path, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            continue
        peft[f"{path}.lora_A.weight"] = parts["A"]
        peft[f"{path}.lora_B.weight"] = parts["B"]
        rank = int(parts["A"].shape[0])
        alphas[path] = float(parts["alpha"]) if "alpha" in parts else float(rank)
    return peft, alphas


def kohya_metadata(variant: str, *, rank: int, alpha: float, title: str | None = None,
                   started_at: float | None = None, resolution: int = 1328) -> dict[str, str]:
    """`ss_*` / `modelspec.*` keys as musubi-tuner writes them for Qwen-Image (networks.lora_qwen_image)."""
    from core.export.metadata import MODELSPEC_VERSION
    from core.family_api.registry import family_info

    started = datetime.datetime.now().timestamp() if started_at is None else started_at
    return {
        "ss_base_model_version": family_info(variant).ss_base_model_version,
        "ss_network_module": "networks.lora_qwen_image",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": num_text(alpha),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCHITECTURE[variant] + "/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title or f"LoRA@{int(started)}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.implementation_version": "lora-scripts",
    }


_IDENTITY_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "modelspec.architecture", "modelspec.implementation")


_KOHYA = KohyaLayout(group_peft, peft_to_kohya, kohya_metadata, _IDENTITY_KEYS)


write_kohya_file = kohya_file_writer(_KOHYA)  # musubi-tuner's `lora_unet_` keys: ComfyUI and diffusers load them
write_diffusers_file = diffusers_writer("QwenImagePipeline", group_peft)


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float], dict[str, str]]:
    """Any Qwen-Image LoRA file (ours, musubi-tuner, ComfyUI / diffusers forms) -> (PEFT, alphas, metadata):
    diffusers' own form is the one with its adapter metadata, the rest `kohya_to_peft` reads."""
    return read_family_lora(path, label="Qwen-Image", from_native=kohya_to_peft, group=group_peft,
                            is_native=lambda tensors, metadata: not (metadata.get("lora_adapter_metadata") and any(
                                ".lora_A." in k for k in tensors)))
