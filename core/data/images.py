"""Scan an image training folder into a list of trainable items with their captions.

The scan is what the trainer (and the Dataset tab's counters) see: every image file in
the folder and its subfolders, its size after EXIF rotation, and its final caption
(metadata.csv, `.txt` files beside the images, or none; the trigger word put in front).
It reads headers and file tails only, never whole images: the trainer decodes each image
once when it caches latents. Files that cannot be trained on are listed in `skipped`
with the reason, never a crash; a folder with nothing usable raises `DatasetError`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.config import TrainConfig
from core.data.captions import (CaptionFileError, caption_txt_path, read_caption_txt_checked,
                                read_metadata_csv)
from core.data.image_io import IMAGE_EXTENSIONS, ImageInfo, ImageReadError, check_complete, probe_image
from core.data.video_io import VIDEO_EXTENSIONS, VideoInfo, frame_windows, is_clip, probe_video

TRAINING_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS  # images and video clips

MIN_SIDE = 64  # below this an image has less than one latent block per 8 px: useless, skipped
METADATA_NAME = "metadata.csv"
_LISTED = 5  # names spelled out in a summary warning before "and N more"


class DatasetError(ValueError):
    """The folder cannot be trained on; the message says what was found and what to do."""


@dataclass
class ImageItem:
    path: Path
    caption: str  # final caption: trigger word prepended (once), stripped
    width: int  # after EXIF rotation
    height: int
    relpath: str = ""  # path inside the training folder, with "/" (as metadata.csv names it)
    format: str = ""
    mode: str = ""
    control: Path | None = None  # a paired data set's control image (core.data.pairs)
    references: list[Path] = field(default_factory=list)  # its further references (control_2, control_3 ...)
    # A video clip's window: the frame indices it trains on (core.data.video_io); () for a still image.
    frames: tuple[int, ...] = ()
    fps: float = 0.0  # the clip's frame rate
    clip_frames: int = 0  # the clip's whole length in frames

    @property
    def is_clip(self) -> bool:
        return bool(self.frames)


@dataclass
class ImageDataset:
    folder: Path
    items: list[ImageItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    warnings: list[str] = field(default_factory=list)
    caption_source: str = "none"  # "metadata" | "txt" | "none"

    def tag_frequency(self) -> dict[str, int]:
        """Comma-separated tags -> how many captions hold them (kohya's ss_tag_frequency)."""
        counts: Counter[str] = Counter()
        for item in self.items:
            tags = {tag.strip().lower() for tag in re.split(r"[,，]", item.caption)}
            counts.update(tag for tag in tags if tag)
        return dict(counts.most_common())


# --- finding files -----------------------------------------------------------------------

def _skip_dir(name: str) -> bool:
    # Hidden folders (.git, .cache, our own temp files), caches and the backups users or
    # tools keep beside their data are never training images.
    lowered = name.lower()
    return name.startswith((".", "__")) or "backup" in lowered or lowered in {"_cache", "cache"}


def find_image_files(folder: str | Path, exclude: tuple[str | Path, ...] = (),
                     extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[list[Path], list[Path]]:
    """Image files under `folder` (recursive, sorted by relative path) and the other files.

    `extensions`: what counts as a training file (IMAGE_EXTENSIONS + VIDEO_EXTENSIONS: clips too).

    Hidden files and folders, backups (`x.png.bak-...`, `backup/`), caches and the folders
    in `exclude` (a run's output folder inside the data: its samples are not training data)
    are left out.
    """
    root = Path(folder)
    excluded = {Path(e).resolve() for e in exclude if str(e)}
    images: list[Path] = []
    others: list[Path] = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skip_dir(d)
                         and (not excluded or (Path(current) / d).resolve() not in excluded))
        for name in files:
            if name.startswith("."):
                continue  # macOS "._x.jpg" resource forks, editors' temp files
            path = Path(current) / name
            (images if path.suffix.lower() in extensions else others).append(path)
    images.sort(key=lambda p: p.relative_to(root).as_posix().lower())
    return images, others


def relative_name(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.name


def inspect_image(path: str | Path) -> ImageInfo:
    """Header, size floor and completeness checks; raises ImageReadError with the reason."""
    info = probe_image(path)
    if min(info.width, info.height) < MIN_SIDE:
        raise ImageReadError(f"{Path(path).name}: too small ({info.width}x{info.height}); training "
                             f"needs at least {MIN_SIDE} px a side. Use a larger version or remove it.")
    check_complete(path, info)
    return info


def short_reason(message: str) -> str:
    """A few words for lists ("damaged", "empty file") from an ImageReadError message."""
    lowered = message.lower()
    for needle, words in (("empty (0 bytes)", "empty file"), ("too large", "too large"),
                          ("too small", "too small"), ("damaged or truncated", "damaged"),
                          ("not a readable image", "not an image")):
        if needle in lowered:
            return words
    return "unreadable"


def _reason(message: str, name: str) -> str:
    # ImageReadError messages start with the bare file name; the list names the file already.
    prefix = f"{Path(name).name}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def inspect_training_file(path: Path) -> ImageInfo | VideoInfo:
    """An image's header checks, or a clip's probe (video files and animated GIFs)."""
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return probe_video(path)
    info = inspect_image(path)
    return probe_video(path) if is_clip(path, info.frames) else info


def clip_windows(info: VideoInfo, cfg: TrainConfig) -> list[tuple[int, ...]]:
    """The frame windows a clip trains on under `cfg` (core.data.video_io.frame_windows)."""
    return frame_windows(info.frames, info.fps, frames=cfg.video_frames, stride=cfg.video_frame_stride,
                         target_fps=cfg.video_fps, mode=cfg.video_windows, count=cfg.video_window_count)


def still_images_only(items: list[ImageItem]) -> tuple[list[ImageItem], list[str]]:
    """For a family that trains no video: animated GIFs back to their first frame (as before clips), video
    files left out; returns (items, the left-out clips' names)."""
    kept: list[ImageItem] = []
    dropped: list[str] = []
    seen: set[Path] = set()
    for item in items:
        if not item.is_clip:
            kept.append(item)
        elif item.path.suffix.lower() == ".gif":
            if item.path not in seen:
                seen.add(item.path)
                kept.append(dataclasses.replace(item, format="GIF", mode="RGB", frames=(), fps=0.0, clip_frames=0))
        elif item.relpath not in dropped:
            dropped.append(item.relpath or item.path.name)
    return kept, dropped


# --- captions ----------------------------------------------------------------------------

def apply_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word in front of the caption, unless the caption already holds it."""
    caption = caption.strip()
    trigger = trigger.strip()
    if not trigger:
        return caption
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def resolve_metadata_path(folder: Path, metadata_path: str = "") -> Path | None:
    """The metadata.csv to use: the configured one, else `<folder>/metadata.csv` when present."""
    if metadata_path:
        return Path(metadata_path)
    default = folder / METADATA_NAME
    return default if default.is_file() else None


def _normal_key(name: str) -> str:
    key = name.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def match_metadata_rows(names: list[str], images: list[Path], folder: Path,
                        metadata_file: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each metadata.csv file name to an image: relative path, absolute path or bare name.

    Tried in order: relative to the training folder, relative to the csv, absolute, then
    the bare file name (case-insensitive as a last resort) when only one image has it.
    Returns (name as written -> image) and the names that match no image.
    """
    by_path = {p.resolve(): p for p in images}
    by_name: dict[str, list[Path]] = {}
    by_lower: dict[str, list[Path]] = {}
    for path in images:
        by_name.setdefault(path.name, []).append(path)
        by_lower.setdefault(path.name.lower(), []).append(path)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        key = _normal_key(name)
        match = None
        if key:
            for base in (folder, metadata_file.parent):
                candidate = by_path.get((base / key).resolve())
                if candidate is not None:
                    match = candidate
                    break
            if match is None:
                bare = key.rsplit("/", 1)[-1]
                for table, lookup in ((by_name, bare), (by_lower, bare.lower())):
                    hits = table.get(lookup, [])
                    if len(hits) == 1:
                        match = hits[0]
                        break
                    if len(hits) > 1:  # prefer the one at the top of the folder
                        top = [p for p in hits if p.parent == folder]
                        match = top[0] if len(top) == 1 else None
                        break
        if match is None:
            missing.append(name)
        else:
            found[name] = match
    return found, missing


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _captions_from_metadata(metadata_file: Path, folder: Path, images: list[Path],
                            warnings: list[str]) -> dict[Path, str]:
    if not metadata_file.is_file():
        raise DatasetError(f"The captions file {metadata_file} does not exist. Fix metadata_path, or set "
                           "caption_source to 'txt' or 'auto'.")
    try:
        read = read_metadata_csv(metadata_file)
    except CaptionFileError as exc:
        raise DatasetError(str(exc)) from exc
    warnings.extend(read.warnings)
    found, missing = match_metadata_rows(list(read.captions), images, folder, metadata_file)
    if missing:
        rows = [f"{name} (line {read.lines.get(name, '?')})" for name in missing]
        warnings.append(f"{metadata_file.name} names {len(missing)} file(s) that are not in {folder}: "
                        f"{_listing(rows)}. Fix the names or remove the rows.")
    return {path: read.captions[name] for name, path in found.items()}


def _captions_from_txt(images: list[Path], extension: str, warnings: list[str]) -> dict[Path, str]:
    captions: dict[Path, str] = {}
    for path in images:
        text, notes = read_caption_txt_checked(path, extension)
        warnings.extend(notes)
        if text is not None:
            captions[path] = text
    return captions


def _choose_caption_source(cfg: TrainConfig, folder: Path, images: list[Path]) -> tuple[str, Path | None]:
    source = (cfg.caption_source or "auto").lower()
    metadata_file = resolve_metadata_path(folder, cfg.metadata_path)
    if source == "metadata":
        return "metadata", metadata_file or folder / METADATA_NAME
    if source == "txt":
        return "txt", None
    if metadata_file is not None:
        return "metadata", metadata_file
    if any(caption_txt_path(p, cfg.caption_extension).is_file() for p in images):
        return "txt", None
    return "none", None


# --- the scan ----------------------------------------------------------------------------

def scan_image_dataset(cfg: TrainConfig) -> ImageDataset:
    """Find the usable images of `cfg.train_data_dir` and their final captions."""
    folder = Path(cfg.train_data_dir)
    if not folder.is_dir():
        raise DatasetError(f"The training folder '{folder}' does not exist or is not a folder. "
                           "Set train_data_dir to the folder with your images.")
    from core.data.pairs import control_dirs, find_controls

    # A paired data set's control folders hold the controls, not training targets.
    exclude = control_dirs(folder) + ((cfg.output_dir,) if cfg.output_dir else ())
    images, others = find_image_files(folder, exclude=exclude, extensions=TRAINING_EXTENSIONS)
    items: list[ImageItem] = []
    skipped: list[tuple[str, str]] = []
    infos: dict[Path, ImageInfo | VideoInfo] = {}
    for path in images:
        try:
            infos[path] = inspect_training_file(path)
        except ImageReadError as exc:
            skipped.append((relative_name(path, folder), _reason(str(exc), path.name)))
    if not infos:
        raise DatasetError(_empty_message(folder, images, others, skipped))

    warnings: list[str] = []
    source, metadata_file = _choose_caption_source(cfg, folder, images)
    usable = [p for p in images if p in infos]
    if source == "metadata" and metadata_file is not None:
        captions = _captions_from_metadata(metadata_file, folder, images, warnings)
    elif source == "txt":
        captions = _captions_from_txt(usable, cfg.caption_extension, warnings)
    else:
        captions = {}
        alone = (f"the caption '{cfg.trigger_word}'. Write captions in the Caption tab to describe more."
                 if cfg.trigger_word else "an empty caption. Write captions in the Caption tab, or set a "
                 "trigger word.")
        warnings.append(f"No captions found in {folder} (no metadata.csv, no {cfg.caption_extension} files): "
                        f"every image trains with {alone}")

    no_caption: list[str] = []
    empty_caption: list[str] = []
    short: list[str] = []
    for path in usable:
        info = infos[path]
        name = relative_name(path, folder)
        raw = captions.get(path)
        if source != "none":
            if raw is None:
                no_caption.append(name)
            elif not raw.strip():
                empty_caption.append(name)
        caption = apply_trigger(raw or "", cfg.trigger_word)
        if isinstance(info, VideoInfo):
            windows = clip_windows(info, cfg)
            if len(windows[0]) < cfg.video_frames:
                short.append(f"{name} ({len(windows[0])} frames)")
            items.extend(ImageItem(path=path, caption=caption, width=info.width, height=info.height, relpath=name,
                                   format=path.suffix.lstrip(".").upper(), mode="RGB", frames=window, fps=info.fps,
                                   clip_frames=info.frames) for window in windows)
            continue
        items.append(ImageItem(path=path, caption=caption, width=info.width, height=info.height, relpath=name,
                               format=info.format, mode=info.mode))
    pairs = find_controls(folder, [i.path for i in items], resolve_metadata_path(folder, cfg.metadata_path))
    used_as_control = {p.resolve() for p in pairs.controls.values()}
    used_as_control |= {p.resolve() for refs in pairs.references.values() for p in refs}
    items = [i for i in items if i.path.resolve() not in used_as_control]  # a control is not a target too
    for item in items:
        item.control = pairs.controls.get(item.path)
        item.references = list(pairs.references.get(item.path, []))
    where = metadata_file.name if source == "metadata" and metadata_file else f"a {cfg.caption_extension} file"
    if no_caption:
        warnings.append(f"{len(no_caption)} image(s) have no caption in {where}: {_listing(no_caption)}. "
                        "They train with " + ("only the trigger word." if cfg.trigger_word else "an empty caption."))
    if empty_caption:
        warnings.append(f"{len(empty_caption)} image(s) have an empty caption: {_listing(empty_caption)}.")
    if short:
        warnings.append(f"{len(short)} clip(s) are shorter than video_frames {cfg.video_frames} after sampling and "
                        f"train at fewer frames (4k+1): {_listing(short)}. Lower video_frames or the stride to "
                        "train them whole.")
    return ImageDataset(folder=folder, items=items, skipped=skipped, warnings=warnings, caption_source=source)


def _empty_message(folder: Path, images: list[Path], others: list[Path], skipped: list[tuple[str, str]]) -> str:
    allowed = ", ".join(IMAGE_EXTENSIONS)
    if not images:
        found = (f"found {len(others)} other file(s): {_listing([relative_name(p, folder) for p in others])}"
                 if others else "the folder is empty")
        return (f"No images in '{folder}' ({found}). Put .jpg/.png/.webp images ({allowed}) in it, "
                "or point train_data_dir at the folder that holds them.")
    listed = [f"{name} ({short_reason(reason)})" for name, reason in skipped]
    return (f"No usable images in '{folder}': {len(images)} file(s), none readable: {_listing(listed)}. "
            "Re-export them as PNG or JPEG (at least 64 px a side) and scan again.")
