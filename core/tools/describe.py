"""Human-readable report of a LoRA file (what `tools/export.py inspect` and the Tools tab show).

The facts come from `core.export.inspect.inspect_lora`; this module only lays them out.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from core.export.inspect import FAMILY_NAMES, LoraFileInfo, inspect_lora

FORMAT_NAMES = {"kohya": "kohya / WebUI / ComfyUI (lora_unet_... keys)",
                "comfyui": "ComfyUI (diffusion_model.<BFL name> keys)",
                "diffusers": "diffusers (pytorch_lora_weights.safetensors)",
                "peft": "PEFT adapter (adapter_model.safetensors)"}
# The metadata WebUI shows or uses, first; the rest is listed by name only unless asked for.
KEY_METADATA = ("ss_output_name", "ss_base_model_version", "ss_sd_model_name", "ss_network_module",
                "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_num_train_images",
                "ss_training_started_at", "ss_steps", "ss_epoch", "ss_learning_rate", "modelspec.architecture",
                "sshs_model_hash", "ss_merged_from", "ss_resized_from", "ss_extracted_from", "merged_loras",
                "base_model", "lora_rank", "lora_alpha")


def component_of(module: str) -> str:
    for prefix, name in (("lora_unet_", "UNet"), ("lora_te1_", "text encoder 1"), ("lora_te2_", "text encoder 2"),
                         ("lora_te3_", "text encoder 3 (T5)"), ("lora_te_", "text encoder"), ("unet.", "UNet"),
                         ("transformer.", "transformer"), ("text_encoder_2.", "text encoder 2"),
                         ("text_encoder.", "text encoder")):
        if module.startswith(prefix):
            return name
    return "model"


def _short(value: str, limit: int = 120) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[: limit - 3] + "..."


def describe_info(info: LoraFileInfo, *, all_modules: bool = False, all_metadata: bool = False) -> str:
    lines = [f"File:      {info.path}",
             f"Format:    {FORMAT_NAMES.get(info.format, info.format)}",
             f"Family:    {FAMILY_NAMES.get(info.family, 'unknown (not told by the metadata or the shapes)')}",
             f"Tensors:   {info.num_tensors}, LoRA modules: {len(info.modules)}"]
    parts = Counter(component_of(m) for m in info.modules)
    lines.append("Trained:   " + ", ".join(f"{name} ({count} modules)" for name, count in parts.items()))
    kinds = [k for k, on in (("LoCon conv layers", info.has_conv), ("DoRA magnitudes", info.has_dora),
                             ("text encoder", info.has_text_encoder)) if on]
    if kinds:
        lines.append("Contains:  " + ", ".join(kinds))
    groups = Counter(info.modules.values())
    lines.append("Rank / alpha (scale = alpha / rank):")
    for (rank, alpha), count in sorted(groups.items()):
        lines.append(f"  rank {rank:>4}  alpha {alpha:g}  scale {alpha / rank:.4g}  x {count} modules")
    if all_modules:
        lines.append("Modules:")
        for name, (rank, alpha) in sorted(info.modules.items()):
            lines.append(f"  {name}  rank {rank}  alpha {alpha:g}")
    if info.nonfinite:
        shown = ", ".join(info.nonfinite[:5]) + (" ..." if len(info.nonfinite) > 5 else "")
        lines.append(f"WARNING: {len(info.nonfinite)} tensor(s) hold NaN or inf ({shown}). This LoRA is broken "
                     "(the training diverged): use an earlier checkpoint or lower the learning rate.")
    for note in info.notes:
        if "NaN" not in note:
            lines.append(f"Note:      {note}")
    if info.metadata:
        lines.append(f"Metadata ({len(info.metadata)} keys):")
        keys = sorted(info.metadata) if all_metadata else [k for k in KEY_METADATA if k in info.metadata]
        for key in keys:
            lines.append(f"  {key}: {_short(info.metadata[key], 10_000 if all_metadata else 120)}")
        rest = sorted(set(info.metadata) - set(keys))
        if rest:
            lines.append(f"  (also: {', '.join(rest)}; --metadata shows all)")
    return "\n".join(lines)


def describe_lora(path: str | Path, *, all_modules: bool = False, all_metadata: bool = False) -> str:
    """The inspect report of a LoRA file or adapter folder."""
    return describe_info(inspect_lora(path), all_modules=all_modules, all_metadata=all_metadata)


def info_as_dict(info: LoraFileInfo) -> dict:
    """The same facts as JSON-friendly data (for `inspect --json`)."""
    return {"path": str(info.path), "format": info.format, "family": info.family,
            "modules": {k: {"rank": r, "alpha": a} for k, (r, a) in info.modules.items()},
            "metadata": info.metadata, "nonfinite": info.nonfinite, "has_text_encoder": info.has_text_encoder,
            "has_conv": info.has_conv, "has_dora": info.has_dora, "notes": info.notes}
