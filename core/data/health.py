"""The Dataset tab's health check: what is wrong with a folder before a run finds out.

`health_check` lists, per file, what will be skipped (errors), what will hurt the result
(warnings: upscaling, extreme shapes, near-duplicates, missing or too long captions,
metadata.csv rows naming missing files) and what is converted on the way (info: alpha on
white, CMYK, grey, 16-bit, animations), plus counts of formats, modes, sizes and buckets.
`bucket_preview` draws the part of an image that training keeps. Unlike the trainer's scan,
the check decodes every image (at a reduced scale where the format allows) to hash it for
near-duplicates, which also finds damage the scan's quick look cannot.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from core.data.buckets import bucket_label, choose_bucket, cover_size, make_buckets
from core.data.captions import (CaptionFileError, caption_txt_path, read_caption_txt_checked,
                                read_metadata_csv)
from core.data.image_io import ImageInfo, ImageReadError, load_rgb
from core.data.images import (TRAINING_EXTENSIONS, DatasetError, find_image_files, inspect_image,
                              match_metadata_rows, relative_name, resolve_metadata_path, short_reason)
from core.data.video_io import VIDEO_EXTENSIONS, VideoInfo, VideoReadError, frame_windows, probe_video

SEVERITIES = ("error", "warning", "info")
EXTREME_ASPECT = 2.5
DUPLICATE_DISTANCE = 4  # dHash bits that may differ for two images to count as near-duplicates
PREVIEW_SIDE = 512

_ADVICE = {
    "empty file": "Delete it, or copy it again from where it came from.",
    "not an image": "The name says image but the content is not one: re-export it as PNG or JPEG, or remove it.",
    "damaged": "Re-export or download it again; the scan skips it until then.",
    "too small": "Use a larger version (at least 64 px a side) or remove it.",
    "too large": "Resize it below 16384 x 16384 pixels.",
    "unreadable": "Re-export it as PNG or JPEG, or remove it from the folder.",
}


@dataclass
class HealthIssue:
    file: str
    severity: str  # "error" (will be skipped) | "warning" | "info"
    problem: str
    advice: str


@dataclass
class HealthReport:
    issues: list[HealthIssue] = field(default_factory=list)
    image_count: int = 0
    usable_count: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    sizes: list[tuple[str, int, int]] = field(default_factory=list)  # (file, w, h)
    buckets: dict[str, int] = field(default_factory=dict)  # "768x512" -> count
    caption_source: str = "none"
    clips: list[VideoInfo] = field(default_factory=list)  # the readable video clips
    # An edit data set: each target (relative name) -> its references in order (control/, control_2/ ...).
    references: dict[str, list[str]] = field(default_factory=dict)

    def count(self, severity: str) -> int:
        return sum(1 for issue in self.issues if issue.severity == severity)

    def rows(self) -> list[list[str]]:
        """The issues as table rows (severity, file, problem, advice) for the GUI."""
        return [[i.severity, i.file, i.problem, i.advice] for i in self.issues]


# --- near-duplicates ---------------------------------------------------------------------

def dhash(image: Image.Image) -> int:
    """64-bit difference hash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour."""
    # reducing_gap box-shrinks big images first: 10x faster, the same hash in practice.
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS, reducing_gap=2.0),
                       dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def near_duplicates(hashes: list[tuple[str, int]],
                    max_distance: int = DUPLICATE_DISTANCE) -> list[tuple[str, str, int]]:
    """Pairs (earlier file, later file, distance) whose hashes differ in at most `max_distance` bits."""
    if len(hashes) < 2:
        return []
    values = np.array([h for _, h in hashes], dtype=np.uint64)
    pairs = []
    for i in range(len(values) - 1):
        diff = np.bitwise_xor(values[i + 1:], values[i])
        distance = np.unpackbits(diff.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        for j in np.nonzero(distance <= max_distance)[0]:
            pairs.append((hashes[i][0], hashes[i + 1 + int(j)][0], int(distance[j])))
    return pairs


# --- captions ----------------------------------------------------------------------------

_TOKEN_PIECES = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A conservative CLIP token count without a tokenizer: words + punctuation + start/end.

    CJK characters count twice (CLIP's byte-level BPE spends 1-3 tokens on each).
    """
    total = 2
    for piece in _TOKEN_PIECES.findall(text):
        total += 2 if len(piece) == 1 and ord(piece) >= 0x3040 and not piece.isascii() else 1
    return total


def count_tokens(text: str, tokenizer: Any) -> int:
    """Tokens the text encoder sees, start and end tokens included."""
    try:
        encoded = tokenizer(text)
        ids = encoded["input_ids"] if not hasattr(encoded, "ids") else encoded.ids
    except (TypeError, KeyError):
        encoded = tokenizer.encode(text)
        ids = getattr(encoded, "ids", encoded)
    return len(ids)


# --- the check ---------------------------------------------------------------------------

class _Collector:
    def __init__(self) -> None:
        self.issues: list[HealthIssue] = []

    def add(self, file: str, severity: str, problem: str, advice: str) -> None:
        self.issues.append(HealthIssue(file, severity, problem, advice))


def _conversion_notes(info: ImageInfo) -> list[tuple[str, str]]:
    notes = []
    if info.transparency:
        notes.append(("has transparency: transparent parts become white",
                      "Fine for most subjects; put it on the background you want if white is wrong."))
    if info.mode == "CMYK":
        notes.append(("CMYK (print) colours: converted to RGB",
                      "Colours may shift slightly; export as sRGB to be sure."))
    if info.mode in ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I", "F"):
        notes.append(("greyscale: trained as a grey RGB image",
                      "Fine if you want grey results; mixed in with colour images it may wash out colours."))
    if info.bits > 8:
        notes.append((f"{info.bits}-bit: reduced to 8 bits per channel", "Nothing to do."))
    if info.frames > 1:
        notes.append((f"animated ({info.frames} frames): only the first frame is used",
                      "Export the frame you want as PNG to choose it yourself."))
    return notes


def _shape_issues(out: _Collector, name: str, info: ImageInfo, bucket: tuple[int, int],
                  resolution: int, bucketing: bool) -> None:
    width, height = info.width, info.height
    new_w, new_h = cover_size(width, height, bucket)
    scale = new_w / width
    if scale > 1.0:
        out.add(name, "warning", f"{width}x{height} is smaller than its {bucket_label(bucket)} bucket: "
                f"will be upscaled {scale:.2f}x (softer detail)",
                f"Use a version at least {resolution} px on the short side if you have one.")
    ratio = max(width, height) / min(width, height)
    if ratio > EXTREME_ASPECT:
        kept = bucket[0] * bucket[1] / (new_w * new_h)
        if bucketing:
            problem = (f"extreme aspect ratio {ratio:.1f}:1: trains in the thin {bucket_label(bucket)} bucket"
                       + (f", {round((1 - kept) * 100)}% cut" if kept < 0.99 else ""))
        else:
            problem = (f"extreme aspect ratio {ratio:.1f}:1: the square crop keeps only {round(kept * 100)}% "
                       "of it")
        out.add(name, "warning", problem, "Crop it to the part that matters, or split it into several images.")


def _examine(path: Path) -> tuple[ImageInfo | None, int, str]:
    """(header info, dHash, "") for a good image, (None, 0, message) for one that will be skipped."""
    try:
        info = inspect_image(path)
        # Decode everything (small where the format allows) so damage deep inside a file is found too.
        return info, dhash(load_rgb(path, draft_size=64)), ""
    except ImageReadError as exc:
        return None, 0, str(exc)


def health_check(folder: str | Path, *, resolution: int = 512, metadata_path: str = "",
                 caption_extension: str = ".txt", bucketing: bool = True, tokenizer: Any = None,
                 max_tokens: int = 77, min_reso: int = 256, max_reso: int = 2048, video_frames: int = 17,
                 video_frame_stride: int = 1, video_fps: float = 0.0) -> HealthReport:
    """Check every image, clip and caption of `folder`; raises DatasetError when it is not a folder.

    Clips (.mp4 .webm .mov ...) are probed with PyAV: unreadable ones are errors, ones too short for
    `video_frames` at the stride / fps warnings, clips of several aspect ratios a warning."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"'{root}' does not exist or is not a folder. Choose the folder with your images.")
    from core.data.pairs import control_dirs, find_controls, pair_issues

    files, _ = find_image_files(root, exclude=control_dirs(root), extensions=TRAINING_EXTENSIONS)
    images = [p for p in files if p.suffix.lower() not in VIDEO_EXTENSIONS]
    out = _Collector()
    report = HealthReport(image_count=len(files))
    bucket_list = make_buckets(resolution, min_reso, max_reso)
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    hashes: list[tuple[str, int]] = []
    usable: list[Path] = []
    for path, (info, image_hash, error) in zip(images, map(_examine, images)):
        name = relative_name(path, root)
        if info is None:
            reason = short_reason(error)
            problem = error.split(": ", 1)[1] if error.startswith(f"{path.name}: ") else error
            out.add(name, "error", f"will be skipped: {problem.split('. ')[0]}", _ADVICE[reason])
            continue
        hashes.append((name, image_hash))
        usable.append(path)
        formats[info.format] += 1
        modes[info.mode] += 1
        report.sizes.append((name, info.width, info.height))
        bucket = choose_bucket(info.width, info.height, bucket_list) if bucketing else (resolution, resolution)
        buckets[bucket_label(bucket)] += 1
        _shape_issues(out, name, info, bucket, resolution, bucketing)
        for problem, advice in _conversion_notes(info):
            out.add(name, "info", problem, advice)

    clip_paths = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    usable += _check_clips(out, report, root, clip_paths, video_frames, video_frame_stride, video_fps)
    for clip in report.clips:
        bucket = choose_bucket(clip.width, clip.height, bucket_list) if bucketing else (resolution, resolution)
        buckets[bucket_label(bucket)] += 1

    for first, second, distance in near_duplicates(hashes):
        out.add(second, "warning", f"near-duplicate of {first} (hash distance {distance} of 64)",
                f"Keep one of {first} and {second} unless the repetition is on purpose: "
                "a duplicate doubles that image's weight.")

    report.caption_source = _check_captions(out, root, files, usable, metadata_path, caption_extension,
                                            tokenizer, max_tokens)
    metadata = resolve_metadata_path(root, metadata_path)
    for file, severity, problem, advice in pair_issues(root, usable, metadata):
        out.add(file, severity, problem, advice)
    scan = find_controls(root, usable, metadata)
    report.references = {relative_name(target, root): [relative_name(p, root)
                                                       for p in (control, *scan.references.get(target, []))]
                         for target, control in scan.controls.items()}
    order = {severity: i for i, severity in enumerate(SEVERITIES)}
    report.issues = sorted(out.issues, key=lambda issue: order.get(issue.severity, 9))
    report.usable_count = len(usable)
    report.formats = dict(formats.most_common())
    report.modes = dict(modes.most_common())
    report.buckets = dict(sorted(buckets.items(), key=lambda kv: -kv[1]))
    return report


def _check_clips(out: _Collector, report: HealthReport, root: Path, clips: list[Path], frames: int, stride: int,
                 fps: float) -> list[Path]:
    """Probe each clip: unreadable ones, ones too short for `frames`, several aspect ratios; returns the usable."""
    usable: list[Path] = []
    for path in clips:
        name = relative_name(path, root)
        try:
            info = probe_video(path)
        except VideoReadError as exc:
            problem = str(exc).split(": ", 1)[-1]
            out.add(name, "error", f"will be skipped: {problem.split('. ')[0]}",
                    "Re-export it as MP4 (H.264), or remove it from the folder.")
            continue
        usable.append(path)
        report.clips.append(info)
        report.sizes.append((name, info.width, info.height))
        taken = len(frame_windows(info.frames, info.fps, frames=frames, stride=stride, target_fps=fps)[0])
        if taken < frames:
            out.add(name, "warning", f"too short for video_frames {frames}: {info.frames} frames "
                    f"({info.duration:.1f} s at {info.fps:g} fps) give {taken} at this stride / fps",
                    "It trains at the shorter count; lower video_frames or the stride, or use a longer clip.")
    shapes = Counter(f"{round(c.width / c.height, 2):g}:1" for c in report.clips)
    if len(shapes) > 1:
        out.add("(clips)", "warning", f"clips in {len(shapes)} aspect ratios: "
                + ", ".join(f"{shape} x{n}" for shape, n in shapes.most_common()),
                "Each shape trains in its own bucket; crop them to one aspect ratio to batch them together.")
    return usable


def _check_captions(out: _Collector, root: Path, images: list[Path], usable: list[Path], metadata_path: str,
                    caption_extension: str, tokenizer: Any, max_tokens: int) -> str:
    """Add caption issues; returns where captions come from ("metadata" | "txt" | "none")."""
    metadata_file = resolve_metadata_path(root, metadata_path)
    captions: dict[Path, str] = {}
    if metadata_file is not None:
        source = "metadata"
        label = metadata_file.name
        if not metadata_file.is_file():
            out.add(label, "error", f"{metadata_file} does not exist",
                    "Fix the metadata path, or leave it empty to use .txt captions.")
            return source
        try:
            read = read_metadata_csv(metadata_file)
        except CaptionFileError as exc:
            out.add(label, "error", str(exc), "Fix the file (a first line 'filename,prompt'), or write captions "
                    "in the Caption tab.")
            return source
        for warning in read.warnings:
            if "is listed twice" not in warning:  # reported with the duplicate rows below
                out.add(label, "warning", warning, "Save the file as UTF-8 with one row per image.")
        found, missing = match_metadata_rows(list(read.captions), images, root, metadata_file)
        for row_name in missing:
            out.add(label, "warning", f"line {read.lines.get(row_name, '?')} names {row_name}, which is not in "
                    "the folder", "Fix the name (relative to the folder) or remove the row.")
        for line, row_name in read.duplicates:
            out.add(label, "warning", f"line {line} lists {row_name} again; the last row's caption is used",
                    "Keep one row per image.")
        captions = {path: read.captions[row] for row, path in found.items()}
        where = f"no row in {label}"
    else:
        source = "none"
        for path in usable:
            text, notes = read_caption_txt_checked(path, caption_extension)
            for note in notes:
                out.add(relative_name(caption_txt_path(path, caption_extension), root), "warning", note,
                        "Save the caption file as UTF-8.")
            if text is not None:
                captions[path] = text
                source = "txt"
        where = f"no {caption_extension} file"
        if source == "none" and usable:
            out.add(root.name or str(root), "warning", "no captions: no metadata.csv and no "
                    f"{caption_extension} files", "Write captions in the Caption tab (or set a trigger word "
                    "to train on it alone).")
            return source

    for path in usable:
        name = relative_name(path, root)
        text = captions.get(path)
        if text is None:
            out.add(name, "warning", f"missing caption ({where})",
                    "Write one in the Caption tab; without it the image trains with only the trigger word.")
        elif not text.strip():
            out.add(name, "warning", "empty caption", "Write one in the Caption tab.")
        else:
            exact = tokenizer is not None
            tokens = count_tokens(text, tokenizer) if exact else estimate_tokens(text)
            if tokens > max_tokens:
                amount = f"{tokens}" if exact else f"about {tokens}"
                out.add(name, "warning", f"caption is {amount} tokens; the text encoder reads only {max_tokens}",
                        "Shorten it or put the important words first: the end is cut off.")
    return source


# --- the crop preview --------------------------------------------------------------------

def _cut_phrase(cut: float, wide_cut: bool) -> str:
    """ "25% from the sides", or "" when (almost) nothing is cut."""
    if cut <= 0.005:
        return ""
    percent = "<1" if cut < 0.01 else str(round(cut * 100))
    return f"{percent}% " + ("from the sides" if wide_cut else "from top and bottom")


def bucket_preview(path: str | Path, resolution: int, *, bucketing: bool = True, min_reso: int = 256,
                   max_reso: int = 2048) -> tuple[Image.Image, str]:
    """The image with the kept region outlined and the cut-off part dimmed, and a sentence saying so.

    Raises ImageReadError (with a message for the user) when the image cannot be read.
    """
    image = load_rgb(path)
    width, height = image.size
    bucket = (choose_bucket(width, height, make_buckets(resolution, min_reso, max_reso)) if bucketing
              else (resolution, resolution))
    new_w, new_h = cover_size(width, height, bucket)
    scale = new_w / width
    kept_w, kept_h = min(width, bucket[0] / scale), min(height, bucket[1] / scale)
    cut = 1.0 - (kept_w * kept_h) / (width * height)
    wide_cut = kept_w < width - 0.5

    shown = image.copy()
    shown.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    factor = shown.width / width
    left, top = (width - kept_w) / 2 * factor, (height - kept_h) / 2 * factor
    box = (round(left), round(top), round(left + kept_w * factor), round(top + kept_h * factor))
    preview = ImageEnhance.Brightness(shown).enhance(0.35)
    preview.paste(shown.crop(box), box[:2])
    ImageDraw.Draw(preview).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 64, 64),
                                      width=max(2, min(preview.size) // 128))

    cut_text = _cut_phrase(cut, wide_cut)
    upscale = f", upscaled {scale:.1f}x" if scale > 1.0 else ""
    if bucketing:
        cut_words = cut_text.replace("% ", "% cut ", 1) if cut_text else "0% cut"
        sentence = f"{width}x{height} -> bucket {bucket[0]}x{bucket[1]}, {cut_words}{upscale}"
    else:
        sentence = f"center crop to {resolution}x{resolution} " + (
            f"cuts {cut_text}" if cut_text else "keeps the whole image") + upscale
    return preview, sentence
