"""The model a base model's previews are drawn on by default: its registry row's `sample_base`, the distilled model
its LoRAs are used on (Krea 2 Turbo for Krea 2 Raw, Z-Image-Turbo for Z-Image), when that model is on this machine;
otherwise the base model itself, said in one sentence. An explicit `sample_base` setting always wins.

"On this machine": beside the base model (a ComfyUI file in the same folder, or a diffusers folder next to the
base's folder, named for the distilled model), or its hub id in the Hugging Face cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.family_api.registry import FAMILIES, FamilyInfo


@dataclass(frozen=True)
class SampleBase:
    model: str     # what previews and the Test tab draw on ("" : the base model itself)
    sentence: str  # what the Train tab and the run say about it ("" : nothing to say)


def distilled_row(family: str) -> FamilyInfo | None:
    """The row of the distilled model `family`'s row names as its sample_base, else None."""
    info = FAMILIES.get(family)
    if info is None or not info.sample_base:
        return None
    return next((row for row in FAMILIES.values() if row.hub_repo == info.sample_base), None)


def _in_hub_cache(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "model_index.json"), str)
    except Exception:  # noqa: BLE001 - no cache, no hub library: not on this machine
        return False


def find_local(base_model: str, family: str) -> str:
    """The distilled model of `family`'s row on this machine (a path or the cached hub id), else ""."""
    info, target = FAMILIES.get(family), distilled_row(family)
    if info is None or target is None:
        return ""
    base = Path(base_model)
    if base.is_file():
        candidates = sorted(base.parent.glob("*.safetensors"))
    elif base.is_dir():
        candidates = sorted(p for p in base.parent.iterdir() if (p / "model_index.json").is_file())
    else:
        candidates = []
    for candidate in candidates:
        if candidate != base and any(w in candidate.name.lower() for w in target.name_words):
            return str(candidate)
    return info.sample_base if _in_hub_cache(info.sample_base) else ""


def default_sample_base(base_model: str, family: str, sample_base: str = "") -> SampleBase:
    """What the previews of a `family` run on `base_model` are drawn on, and the sentence that says so."""
    target = distilled_row(family)
    if sample_base or target is None:
        return SampleBase(sample_base, "")
    label = FAMILIES[family].label
    found = find_local(base_model, family)
    if found:
        return SampleBase(found, f"Previews and the Test tab draw on {target.label} ({found}), the model a {label} "
                                 f"LoRA is used on, at its {target.preview_steps} steps.")
    return SampleBase("", f"{target.label} ({FAMILIES[family].sample_base}) is not on this machine, so previews are "
                          f"drawn on {label}; download it (or set sample_base) to preview on the model the LoRA is "
                          "used on.")
