"""Which captioners exist, where their files come from, and which family each belongs to.

A user names a captioner three ways: a short name from `CAPTIONERS` (`blip-base`), a
local folder holding a transformers model (`./models/my-blip`), or a hub id
(`Salesforce/blip-image-captioning-large`). Short names look first in
`models/captioners/<name>/` (the offline place), then in the Hugging Face cache, then on
the hub. `resolve_captioner` turns any of them into a `ResolvedCaptioner`; loading the
weights is `core.caption.models`' job.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("blip", "git", "florence2", "vlm", "filename")

# Files a user copies into models/captioners/<name>/ when offline (weights may be .bin too).
NEEDED_FILES = "config.json, model.safetensors (or pytorch_model.bin), preprocessor/processor and tokenizer files"


class CaptionerNotFoundError(ValueError):
    """The captioner name is neither a short name, a folder, nor a hub id."""


@dataclass(frozen=True)
class CaptionerSpec:
    """One captioner the app offers by short name."""

    name: str
    model_id: str  # hub id; "" for captioners that need no model
    family: str  # one of FAMILIES
    description: str
    download_gb: float = 0.0
    prompt: str = ""  # task token (Florence-2) or instruction (VLMs); "" for plain captioners


VLM_PROMPT = "Describe this image in detail."
FLORENCE_TASK = "<DETAILED_CAPTION>"

CAPTIONERS: dict[str, CaptionerSpec] = {spec.name: spec for spec in (
    CaptionerSpec("blip-base", "Salesforce/blip-image-captioning-base", "blip",
                  "BLIP base: short captions, fast, 1 GB", 0.99),
    CaptionerSpec("blip-large", "Salesforce/blip-image-captioning-large", "blip",
                  "BLIP large: better short captions, 1.9 GB", 1.88),
    CaptionerSpec("git-base", "microsoft/git-base-coco", "git",
                  "GIT base (COCO): short captions, 0.7 GB", 0.71),
    CaptionerSpec("git-large", "microsoft/git-large-coco", "git",
                  "GIT large (COCO): short captions, 1.6 GB", 1.58),
    CaptionerSpec("florence-2-base", "florence-community/Florence-2-base", "florence2",
                  "Florence-2 base: detailed captions, 0.5 GB", 0.46, FLORENCE_TASK),
    CaptionerSpec("florence-2-large", "florence-community/Florence-2-large", "florence2",
                  "Florence-2 large: detailed captions, 1.6 GB", 1.56, FLORENCE_TASK),
    CaptionerSpec("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", "vlm",
                  "SmolVLM 256M: long descriptions, small, 0.5 GB", 0.51, VLM_PROMPT),
    CaptionerSpec("smolvlm-500m", "HuggingFaceTB/SmolVLM-500M-Instruct", "vlm",
                  "SmolVLM 500M: long descriptions, 1 GB", 1.02, VLM_PROMPT),
    CaptionerSpec("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "vlm",
                  "Qwen2-VL 2B: long, accurate descriptions (GPU advised), 4.4 GB", 4.42, VLM_PROMPT),
    CaptionerSpec("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "vlm",
                  "Qwen2.5-VL 3B: long, accurate descriptions (GPU advised), 7.5 GB", 7.5, VLM_PROMPT),
    CaptionerSpec("filename", "", "filename",
                  "From the file name: red_dragon_02.png -> 'red dragon' (no model)"),
)}

DEFAULT_PROMPTS = {"florence2": FLORENCE_TASK, "vlm": VLM_PROMPT}


@dataclass(frozen=True)
class ResolvedCaptioner:
    """Where a captioner's files are and how to run it."""

    name: str  # what the user typed
    family: str
    source: str  # local folder path, or hub id ("" for the filename captioner)
    local: bool  # True when `source` is a folder on disk
    model_id: str = ""  # the hub id behind a short name ("" for a plain folder)
    offline_dir: Path | None = None  # where to put the files for offline use (short names)
    prompt: str = ""
    remote_code: bool = False  # the model ships its own Python code (auto_map in config.json)


def models_roots() -> list[Path]:
    """Folders that may hold `captioners/<name>/`, first match wins.

    `LORA_MODELS_DIR` when set; else the app's work folder (`LORA_SCRIPTS_WORKDIR/models`,
    as the GUI uses), the current folder's `models/` (the seed's `./models/...` paths), and
    the project's `models/`.
    """
    if os.environ.get("LORA_MODELS_DIR"):
        return [Path(os.environ["LORA_MODELS_DIR"])]
    roots = []
    if os.environ.get("LORA_SCRIPTS_WORKDIR"):
        roots.append(Path(os.environ["LORA_SCRIPTS_WORKDIR"]) / "models")
    roots += [Path.cwd() / "models", ROOT / "models"]
    unique: list[Path] = []
    for root in roots:
        if all(root.resolve() != seen.resolve() for seen in unique):
            unique.append(root)
    return unique


def offline_dir(name: str, root: Path | None = None) -> Path:
    """Where the files of short name `name` are (the first root holding them) or should go."""
    roots = [root] if root is not None else models_roots()
    for candidate in roots:
        if _has_model_files(candidate / "captioners" / name):
            return candidate / "captioners" / name
    return roots[0] / "captioners" / name


def captioner_names() -> list[str]:
    return list(CAPTIONERS)


def captioner_status(name: str, root: Path | None = None) -> str:
    """Where a short name's files would come from, for the GUI's dropdown (never downloads)."""
    spec = CAPTIONERS.get(name)
    if spec is None:
        return ""
    if not spec.model_id:
        return "no model needed"
    if _has_model_files(offline_dir(name, root)):
        return f"local copy in {offline_dir(name, root)}"
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec.model_id, "config.json"), str):
            return "in the Hugging Face cache"
    except ImportError:
        pass
    return (f"downloads {spec.download_gb:.1f} GB from the hub on first use "
            f"(offline: put the files in {offline_dir(name, root)})")


def _has_model_files(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def family_from_config(config: dict, where: str) -> tuple[str, bool]:
    """The family of a transformers model from its config.json contents (+ whether it needs remote code)."""
    model_type = str(config.get("model_type", "")).lower()
    remote = bool(config.get("auto_map"))
    if model_type == "blip":
        return "blip", False
    if model_type == "git":
        return "git", False
    if model_type == "florence2":
        return "florence2", remote
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vlm", False
    if remote:
        return "vlm", True
    raise CaptionerNotFoundError(
        f"{where}: model type {model_type or '(none)'!r} is not an image captioner. Use a BLIP, GIT, "
        f"Florence-2 or vision-language model, or one of: {', '.join(CAPTIONERS)}.")


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CaptionerNotFoundError(f"{folder / 'config.json'}: cannot be read ({exc}). "
                                     "Copy the model folder again.") from exc


def _hub_config(model_id: str) -> dict | None:
    """config.json of a hub model from the local cache, or from the hub when online; None if neither."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            break
        try:
            path = hf_hub_download(model_id, "config.json", local_files_only=local_only)
        except Exception:  # noqa: BLE001 - not cached / offline / no such repo: try the next way
            continue
        return json.loads(Path(path).read_text(encoding="utf-8"))
    return None


def resolve_captioner(name: str, root: Path | None = None) -> ResolvedCaptioner:
    """Turn a short name, folder or hub id into a `ResolvedCaptioner` (does not load weights)."""
    text = str(name).strip()
    if not text:
        raise CaptionerNotFoundError(f"No captioner given. Choose one of: {', '.join(CAPTIONERS)}.")
    spec = CAPTIONERS.get(text.lower())
    if spec is not None:
        if spec.family == "filename":
            return ResolvedCaptioner(spec.name, "filename", "", True, prompt="")
        folder = offline_dir(spec.name, root)
        if _has_model_files(folder):
            family, remote = family_from_config(_read_config(folder), str(folder))
            return ResolvedCaptioner(spec.name, family, str(folder), True, spec.model_id, folder,
                                     spec.prompt, remote)
        return ResolvedCaptioner(spec.name, spec.family, spec.model_id, False, spec.model_id, folder,
                                 spec.prompt)
    path = Path(text).expanduser()
    if path.is_dir():
        if not _has_model_files(path):
            raise CaptionerNotFoundError(f"{path}: the folder has no config.json. Put a transformers "
                                         f"captioner there ({NEEDED_FILES}).")
        family, remote = family_from_config(_read_config(path), str(path))
        return ResolvedCaptioner(text, family, str(path), True, prompt=DEFAULT_PROMPTS.get(family, ""),
                                 remote_code=remote)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text
    if not looks_like_hub_id:
        raise CaptionerNotFoundError(f"{text!r} is not a captioner name, a folder, or a hub id "
                                     f"(owner/name). Choose one of: {', '.join(CAPTIONERS)}.")
    config = _hub_config(text)
    if config is None:
        raise CaptionerNotFoundError(
            f"{text}: not in the local Hugging Face cache and the hub cannot be reached. Connect to the "
            f"internet once, or download the model and pass its folder with --model <folder>.")
    family, remote = family_from_config(config, text)
    return ResolvedCaptioner(text, family, text, False, text, prompt=DEFAULT_PROMPTS.get(family, ""),
                             remote_code=remote)
