"""Presets: partial configs in presets/*.yaml merged under the user's own values."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose one of: auto, {', '.join(preset_names())}.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data.pop("description", None)
    return data


def apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """Return `raw` with the named preset's values filled in where the user set none."""
    name = str(raw.get("preset") or "")
    if not name:
        return dict(raw)
    merged = load_preset(name)
    merged.update(raw)
    return merged
