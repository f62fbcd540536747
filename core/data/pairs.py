"""Paired data sets: each training image (the target) with a control image (what an edit model starts from).

Two ways to give the pairs, the first that names a control wins:
- a `control` column in metadata.csv (a path relative to the training folder, or absolute);
- a `control/` folder beside the images with a file of the same stem (`cat.png` <- `control/cat.jpg`;
  for images in sub-folders `control/<sub>/<stem>.*`).
The `control/` folder itself is never scanned for training images. Families that train on pairs
(registry `needs_control`, e.g. Qwen-Image-Edit) get each item's control; the Dataset tab's health
check lists missing and unreadable control images and pairs whose sizes differ.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from core.data.captions import FILENAME_COLUMNS
from core.data.image_io import IMAGE_EXTENSIONS

CONTROL_DIR = "control"
CONTROL_COLUMNS = ("control", "control_image", "control_path", "source")


@dataclass
class PairScan:
    controls: dict[Path, Path] = field(default_factory=dict)   # target image -> its control image
    missing: list[Path] = field(default_factory=list)          # targets without a control
    named_missing: list[tuple[Path, str]] = field(default_factory=list)  # (target, name in metadata) not found
    has_pairs: bool = False                                    # a control folder or column exists


def control_dir(folder: str | Path) -> Path:
    return Path(folder) / CONTROL_DIR


def _metadata_controls(metadata_file: Path | None) -> dict[str, str]:
    """{file name: control name} of metadata.csv's control column (empty without one)."""
    if metadata_file is None or not metadata_file.is_file():
        return {}
    try:
        text = metadata_file.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError:
        return {}
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        return {}
    header = [c.strip().lower() for c in rows[0]]
    name_col = next((header.index(c) for c in FILENAME_COLUMNS if c in header), None)
    control_col = next((header.index(c) for c in CONTROL_COLUMNS if c in header), None)
    if name_col is None or control_col is None:
        return {}
    return {r[name_col].strip(): r[control_col].strip() for r in rows[1:]
            if len(r) > max(name_col, control_col) and r[name_col].strip() and r[control_col].strip()}


def _by_stem(folder: Path) -> dict[str, Path]:
    """{relative path without suffix, lower case: file} of the control folder's images."""
    root = control_dir(folder)
    if not root.is_dir():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            out[path.relative_to(root).with_suffix("").as_posix().lower()] = path
    return out


def find_controls(folder: str | Path, images: list[Path], metadata_file: Path | None = None) -> PairScan:
    """The control image of each target in `images` (metadata.csv's control column, then control/)."""
    folder = Path(folder)
    column = _metadata_controls(metadata_file)
    stems = _by_stem(folder)
    scan = PairScan(has_pairs=bool(column) or control_dir(folder).is_dir())
    if not scan.has_pairs:
        return scan
    for image in images:
        try:
            rel = image.relative_to(folder)
        except ValueError:
            rel = Path(image.name)
        named = column.get(rel.as_posix()) or column.get(image.name)
        if named:
            path = Path(named) if Path(named).is_absolute() else folder / named
            if path.is_file():
                scan.controls[image] = path
            else:
                scan.named_missing.append((image, named))
            continue
        found = stems.get(rel.with_suffix("").as_posix().lower())
        if found is not None:
            scan.controls[image] = found
        else:
            scan.missing.append(image)
    return scan


def pair_issues(folder: str | Path, images: list[Path], metadata_file: Path | None = None
                ) -> list[tuple[str, str, str, str]]:
    """(file, severity, problem, advice) of every pair problem: missing / unreadable controls, size mismatches."""
    from core.data.image_io import ImageReadError
    from core.data.images import inspect_image, relative_name

    folder = Path(folder)
    scan = find_controls(folder, images, metadata_file)
    if not scan.has_pairs:
        return []
    issues = []
    for image in scan.missing:
        issues.append((relative_name(image, folder), "warning", "no control image (no control/ file of the same "
                       "name, no control column entry)",
                       f"Add {CONTROL_DIR}/{image.stem}.png, or name it in metadata.csv's control column; an edit "
                       "model skips targets without a control."))
    for image, named in scan.named_missing:
        issues.append((relative_name(image, folder), "warning", f"its control image '{named}' does not exist",
                       "Fix the control column of metadata.csv or add the file."))
    for image, control in scan.controls.items():
        try:
            target_info = inspect_image(image)
            control_info = inspect_image(control)
        except ImageReadError as exc:
            issues.append((relative_name(control, folder), "error", f"control image unreadable: {exc}",
                           "Re-export it as PNG or JPEG; its pair is skipped."))
            continue
        t, c = (target_info.width, target_info.height), (control_info.width, control_info.height)
        if t != c:
            same_shape = abs(t[0] / t[1] - c[0] / c[1]) < 0.01
            issues.append((relative_name(image, folder), "info" if same_shape else "warning",
                           f"control {c[0]}x{c[1]} and target {t[0]}x{t[1]} differ"
                           + ("" if same_shape else " in shape"),
                           "The control is resized (and center-cropped) to the target's bucket; give both the "
                           "same size so nothing is cut off." if not same_shape else
                           "The control is resized to the target's bucket."))
    return issues
