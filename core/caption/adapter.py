""""My captioner": a VLM LoRA trained here (text_method: vlm) applied to its base and captioning.

A run folder or its adapter folder is recognised by adapter_config.json; captioner.json beside
it (written by core.train.vlm) names the base captioner and the question it learned to
answer. The base loads as any chat captioner does, the adapter is merged into it in memory,
and the result captions exactly as the built-in captioners do.
"""
from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
CAPTIONER_FILE = "captioner.json"


class NotACaptionerAdapter(ValueError):
    """The adapter folder does not say which captioner it was trained on."""


def find_adapter(name: str | Path) -> Path | None:
    """The adapter folder of a run folder or adapter folder `name`; None when it holds none."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def adapter_captioner(adapter: Path) -> tuple[str, str]:
    """(the base captioner's name, folder or hub id; the question it learned, "" when unknown)."""
    info_file = adapter / CAPTIONER_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        return str(info.get("base_model", "")), str(info.get("prompt", ""))
    config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = str(config.get("base_model_name_or_path") or "")
    if not base:
        raise NotACaptionerAdapter(f"{adapter}: the adapter does not name its base model. Use the adapter folder "
                                   "of a run trained with text_method: vlm.")
    return base, ""


def captioner_adapters(output_dir: Path) -> list[Path]:
    """The adapter folders of VLM runs under `output_dir` (those with captioner.json), newest first."""
    if not output_dir.is_dir():
        return []
    found = [p.parent for p in output_dir.rglob(CAPTIONER_FILE) if (p.parent / ADAPTER_CONFIG).is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
