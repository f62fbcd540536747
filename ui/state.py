"""Process-wide state of the app: the one Job, the project folders, the folders a user opened.

Training and captioning run in `JOB`'s background thread, never in a request handler (runs
queued with `QUEUE` start there one after another);
every tab polls `JOB.snapshot()`, so reloading the page (or opening a second window)
shows the same run. Files are served only from the project's folders and the folders
the user picked in the app (`allow_folder`), never from anywhere else on the disk.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from core.job import Job
from core.queue import RunQueue

ROOT = Path(__file__).resolve().parent.parent
# Where data/, models/, output/ live: the project folder, or LORA_SCRIPTS_WORKDIR (tests use a temp one).
WORK = Path(os.environ.get("LORA_SCRIPTS_WORKDIR") or ROOT).resolve()
DATA_DIR = WORK / "data"
MODELS_DIR = WORK / "models"
OUTPUT_DIR = WORK / "output"
CACHE_DIR = WORK / ".cache" / "ui"  # thumbnails, previews and compare grids made by the app
MODEL_SUBDIRS = {"image": "Stable-diffusion", "lora": "Lora", "text": "llm"}

JOB = Job()


def _start_queued(job: Job, config: object) -> None:
    # The Train tab's start (serve the output folder, free the Test tab's models) for queued runs too.
    from ui.train_tab import start_run

    start_run(job, config)


_LAST_RUN: list[object] = []  # the TrainConfig of the run started last (a reloaded page shows it again)


def remember_run(config: object) -> None:
    _LAST_RUN[:] = [config]


def last_run() -> object | None:
    """The config of the running (or last) training run this app started; None before the first."""
    return _LAST_RUN[0] if _LAST_RUN else None


QUEUE = RunQueue(JOB, _start_queued)  # runs added while another trains; they start one after another

_allowed_lock = threading.Lock()
_ALLOWED: list[Path] = []


def project_folders() -> list[Path]:
    """The folders the app may always serve files from."""
    return [DATA_DIR, MODELS_DIR, OUTPUT_DIR, CACHE_DIR]


def allowed_folders() -> list[str]:
    """Absolute folders for Gradio's `allowed_paths` (shared list: folders opened later are added)."""
    with _allowed_lock:
        return [str(p) for p in project_folders() + _ALLOWED]


def allow_folder(folder: str | Path, app: object | None = None) -> None:
    """Let the app serve files from a folder the user chose (dataset or output outside the project)."""
    path = Path(folder).expanduser().resolve()
    with _allowed_lock:
        if any(path == p or p in path.parents for p in project_folders() + _ALLOWED):
            return
        _ALLOWED.append(path)
    blocks = app if app is not None else _APP.get("blocks")
    if blocks is not None and isinstance(getattr(blocks, "allowed_paths", None), list):
        blocks.allowed_paths.append(str(path))


_APP: dict[str, object] = {}


def register_app(blocks: object) -> None:
    """Remember the running Blocks so folders opened later can be added to its allowed paths."""
    _APP["blocks"] = blocks


_UNSAFE = re.compile(r"[^\w.\- ]+", re.UNICODE)


def safe_name(name: str, fallback: str = "file") -> str:
    """A file or folder name with no path parts, no control or shell characters, no leading dots."""
    base = Path(str(name).replace("\\", "/")).name
    cleaned = _UNSAFE.sub("_", base).strip(" .")
    cleaned = cleaned[:120]
    if not cleaned or cleaned in {".", ".."}:
        return fallback
    return cleaned


def ensure_folders() -> None:
    for folder in project_folders() + [MODELS_DIR / sub for sub in MODEL_SUBDIRS.values()]:
        folder.mkdir(parents=True, exist_ok=True)


def resolve_user_path(text: str) -> Path:
    """A path typed by the user: `~` expanded, relative paths taken from the work folder."""
    path = Path(str(text).strip().strip('"').strip("'")).expanduser()
    return path if path.is_absolute() else (WORK / path)


# -- device detection, warmed up in the background ---------------------------------------------
# Detecting the device imports torch (seconds); it runs in a thread after the page is up, so
# the first page load never waits for it, and the Train tab shows the result on its next poll.
_DEVICE: dict[str, str] = {}
_DEVICE_LOCK = threading.Lock()


def device_line() -> str | None:
    """'Detected: NVIDIA ... (8.0 GB, 7.1 GB free)', or None while detection is still running."""
    return _DEVICE.get("line")


def detect_device_now() -> str:
    with _DEVICE_LOCK:
        if "line" in _DEVICE:
            return _DEVICE["line"]
        try:
            from core.presets import detect_device

            info = detect_device()
            line = f"Detected: {info.label}."
            if info.kind == "cpu":
                line += " Training on the CPU works for tiny tests and text LoRAs of small models; images are slow."
        except Exception as exc:  # noqa: BLE001 - the app must open even if detection fails
            line = f"Device detection failed: {exc}"
        _DEVICE["line"] = line
        return line


_WARMUP: list[threading.Thread] = []


def start_warmup() -> None:
    """Detect the device in the background, once; called by the first poll of an open page, so the
    torch import never competes with serving the first page."""
    with _allowed_lock:
        if _WARMUP:
            return
        thread = threading.Thread(target=detect_device_now, name="lora-warmup", daemon=True)
        _WARMUP.append(thread)
    thread.start()
