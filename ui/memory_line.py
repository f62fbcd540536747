"""The Train tab's memory line: the predicted peak memory of the values in the form, in plain words.

It always estimates the form itself (the preset's values are already in it once chosen, so
the line never talks about a preset), and says whether that fits the memory this machine
has free: "Estimated peak memory: 3.2 GB of your 11.0 GB usable (fits)".
"""
from __future__ import annotations

from typing import Any

from core.memory import MemoryEstimate, format_gb


def memory_words(estimate: MemoryEstimate, model_label: str, device_label: str) -> str:
    """The sentence for an estimate; when it will not fit, what to change follows."""
    verdict = "fits" if estimate.fits else "will likely NOT fit"
    parts = estimate.parts_text()
    text = (f"**Memory:** Estimated peak memory: {format_gb(estimate.total_gb)} of your "
            f"{format_gb(estimate.budget_gb)} usable ({verdict}) — {model_label} on {device_label}.")
    if not estimate.fits and estimate.advice:
        text += f" {estimate.advice}"
    unit = "GB by part" if estimate.total_gb >= 0.1 else "By part"
    return text + (f"  \n<small>{unit}: {parts}</small>" if parts else "")


def memory_line(raw: dict[str, Any]) -> str:
    """The line for the form's raw values (`preset` ignored: its values are in the form already)."""
    try:
        from core.memory import estimate_memory
        from core.model_info import detect_model
        from core.presets import detect_device, loose_config

        cfg = loose_config({k: v for k, v in raw.items() if k != "preset" and v is not None})
        model = detect_model(cfg.base_model, cfg.task_type, cfg.gguf_file)
        device = detect_device()
        return memory_words(estimate_memory(cfg, model, device), model.label, device.label)
    except Exception as exc:  # noqa: BLE001 - an estimate must never break the form
        return f"Memory estimate unavailable: {exc}"
