"""What the dropdowns offer: base models, LoRA files, data sets and runs found on disk.

WebUI-style folders are searched: `models/Stable-diffusion/` (checkpoints and diffusers
folders), ComfyUI's `models/diffusion_models/` and `models/unet/` (FLUX.1 / Chroma transformer
files), `models/Lora/` (LoRA files), `models/llm/` (HF folders, GGUF and GGML v3 files); data sets
are the folders under `data/`, runs the folders under `output/`. Every list is plain
paths, re-read each time a dropdown is refreshed (its tab is selected, or its ↻ pressed).

A folder holding `model_index.json` is one diffusers model, and a folder holding `config.json`
is a part of one (unet/, text_encoder/, transformer/) or an HF model: the weight files inside
are never offered as checkpoints of their own, even while a copy is still in progress and the
`model_index.json` beside them has not arrived yet.
"""
from __future__ import annotations

from pathlib import Path

from core.model_info import is_ggml_v3_file
from ui.state import DATA_DIR, MODEL_SUBDIRS, MODELS_DIR, OUTPUT_DIR, WORK

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# ComfyUI keeps the FLUX.1 / Chroma / SD3 transformer apart from its text encoders and VAE; its
# checkpoints/ folder holds the all-in-one files (SAI's sd3.5_medium.safetensors, SD 1.x / SDXL).
COMFY_IMAGE_SUBDIRS = ("diffusion_models", "unet", "checkpoints")
TEXT_DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".txt", ".parquet")


def rel(path: Path) -> str:
    """A path relative to the project when inside it (what a YAML should hold), else absolute."""
    try:
        return "./" + path.resolve().relative_to(WORK).as_posix()
    except ValueError:
        return str(path)


def with_empty(label: str, choices: list[str]) -> list[tuple[str, str]]:
    """`choices` after an empty choice that reads `label` (a bare "" shows as a lone ✓ in the list)."""
    return [(label, ""), *((choice, choice) for choice in choices)]


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or any(path.glob("*.gguf"))


def _is_model_part(path: Path) -> bool:
    """A diffusers component or HF model folder: its weights belong to a model, not to the list."""
    return (path / "config.json").is_file()


def _image_models_in(folder: Path) -> list[Path]:
    """Checkpoint files and diffusers folders under `folder`; a diffusers folder is one model, so
    its parts (unet/, transformer/, text_encoder/ ... files) are never listed."""
    found: list[Path] = []
    for item in sorted(folder.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir():
            if _is_diffusers_folder(item):
                found.append(item)
            elif not _is_model_part(item):
                found += _image_models_in(item)
        elif item.suffix.lower() in CHECKPOINT_SUFFIXES:
            found.append(item)
    return found


def image_models(models_dir: Path = MODELS_DIR) -> list[str]:
    """Single files and diffusers folders under models/Stable-diffusion/, then ComfyUI's
    models/diffusion_models/, models/unet/ and models/checkpoints/."""
    found: list[Path] = []
    for sub in (MODEL_SUBDIRS["image"], *COMFY_IMAGE_SUBDIRS):
        folder = models_dir / sub
        if folder.is_dir():
            found += _image_models_in(folder)
    return [rel(p) for p in found]


def text_models(models_dir: Path = MODELS_DIR) -> list[str]:
    """HF model folders, GGUF files and GGML v3 llama .bin files (by their magic bytes) under models/llm/."""
    folder = models_dir / MODEL_SUBDIRS["text"]
    found: list[Path] = []
    if folder.is_dir():
        for item in sorted(folder.iterdir()):
            single_file = item.is_file() and (item.suffix.lower() == ".gguf"
                                              or item.suffix.lower() == ".bin" and is_ggml_v3_file(item))
            if single_file or item.is_dir() and _is_hf_folder(item):
                found.append(item)
    return [rel(p) for p in found]


def base_models(task_type: str, models_dir: Path = MODELS_DIR) -> list[str]:
    return text_models(models_dir) if task_type == "text-generation" else image_models(models_dir)


def datasets(data_dir: Path = DATA_DIR) -> list[str]:
    """Folders under data/, text data files directly in data/, and the files of a folder of text data
    (one level down; an image folder's captions and metadata.csv are not data sets of their own)."""
    from core.data.text_report import is_text_dataset, text_data_files

    if not data_dir.is_dir():
        return []
    found = []
    for item in sorted(data_dir.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir():
            found.append(rel(item))
            if is_text_dataset(item):
                found += [rel(file) for file in text_data_files(item)]
        elif item.suffix.lower() in TEXT_DATA_SUFFIXES:
            found.append(rel(item))
    return found


def _loadable_lora(folder: Path) -> Path | None:
    """The LoRA file of a run or checkpoint folder that a pipeline can load (not the PEFT resume files)."""
    preferred = folder / "pytorch_lora_weights.safetensors"
    if preferred.is_file():
        return preferred
    files = [p for p in sorted(folder.glob("*.safetensors")) if not p.stem.endswith("_peft")]
    return files[0] if files else None


def checkpoint_loras(lora_file: str | Path) -> list[tuple[int, Path]]:
    """(step, LoRA file) of every checkpoint of the run that `lora_file` belongs to, oldest first."""
    path = Path(lora_file)
    run = path.parent.parent.parent if path.parent.parent.name == "checkpoints" else path.parent
    found = []
    for folder in sorted((run / "checkpoints").glob("step-*")):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        lora = _loadable_lora(folder)
        if lora is not None:
            found.append((step, lora))
    return sorted(found)


def lora_files(models_dir: Path = MODELS_DIR, output_dir: Path = OUTPUT_DIR) -> list[str]:
    """LoRA files to test: runs' final files and checkpoints, and every file in models/Lora/."""
    found: list[Path] = []
    if output_dir.is_dir():
        for run in sorted(output_dir.iterdir()):
            if not run.is_dir():
                continue
            found += [p for p in sorted(run.glob("*.safetensors")) if not p.stem.endswith("_peft")]
            found += [p for p in sorted(run.glob("checkpoints/*/*.safetensors")) if not p.stem.endswith("_peft")]
    lora_dir = models_dir / MODEL_SUBDIRS["lora"]
    if lora_dir.is_dir():
        found += sorted(lora_dir.rglob("*.safetensors"))
    return [rel(p) for p in found]


def text_adapters(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """PEFT adapter folders (adapter_config.json) in runs and their checkpoints, and the GGUF adapters
    written for llama.cpp / Ollama (`*.lora.gguf`, as Tools > GGUF names them)."""
    if not output_dir.is_dir():
        return []
    return ([rel(p.parent) for p in sorted(output_dir.rglob("adapter_config.json"))]
            + [rel(p) for p in sorted(output_dir.rglob("*.lora.gguf"))])
