"""Paired data sets: each training image (the target) with a control image (what an edit model starts from).

Two ways to give the pairs, the first that names a control wins:
- a `control` column in metadata.csv (a path relative to the training folder, or absolute);
- a `control/` folder beside the images with a file of the same stem (`cat.png` <- `control/cat.jpg`;
  for images in sub-folders `control/<sub>/<stem>.*`).
A target may have more references (edit models that take several images, Qwen-Image-Edit-2509 / FLUX.2 klein
edit): `control_2/`, `control_3/` ... folders or `control_2`, `control_3` ... columns, found the same way, in
that order after the first. The control folders themselves are never scanned for training images. Families that train on pairs
(registry `needs_control`, e.g. Qwen-Image-Edit) get each item's control; families of several references
(registry `max_references`: Qwen-Image-Edit-2509 / 2511, FLUX.2 klein) the control and its further references,
and train items without any as plain images; the Dataset tab's health check lists missing and unreadable
control images and references and pairs whose sizes differ.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.data.captions import FILENAME_COLUMNS
from core.data.image_io import IMAGE_EXTENSIONS

CONTROL_DIR = "control"
CONTROL_COLUMNS = ("control", "control_image", "control_path", "source")
_MORE = re.compile(r"^control_(\d+)$")  # control_2, control_3 ...: a target's further references (folder or column)


@dataclass
class PairScan:
    controls: dict[Path, Path] = field(default_factory=dict)   # target image -> its control image
    missing: list[Path] = field(default_factory=list)          # targets without a control
    named_missing: list[tuple[Path, str]] = field(default_factory=list)  # (target, name in metadata) not found
    has_pairs: bool = False                                    # a control folder or column exists
    # target -> its further references (control_2, control_3 ...), in order, for targets with a first control
    references: dict[Path, list[Path]] = field(default_factory=dict)
    # (target, the reference it lacks: "control_2/<stem>.*" or the name in metadata.csv) of a further reference
    # a control_N folder or column gives others but not this target, or names without the file existing
    missing_references: list[tuple[Path, str]] = field(default_factory=list)


def control_dir(folder: str | Path) -> Path:
    return Path(folder) / CONTROL_DIR


def _index(name: str) -> int | None:
    m = _MORE.match(name.strip().lower())
    return int(m.group(1)) if m and int(m.group(1)) >= 2 else None


def reference_dirs(folder: str | Path) -> list[Path]:
    """The `control_2/`, `control_3/` ... folders beside the images, in their order."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(_index(p.name), p) for p in folder.iterdir() if p.is_dir() and _index(p.name) is not None]
    return [p for _, p in sorted(found)]


def control_dirs(folder: str | Path) -> tuple[Path, ...]:
    """Every folder of control images (never scanned for training targets)."""
    return (control_dir(folder), *reference_dirs(folder))


def _metadata_rows(metadata_file: Path | None) -> tuple[list[str], list[list[str]]]:
    if metadata_file is None or not metadata_file.is_file():
        return [], []
    try:
        text = metadata_file.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError:
        return [], []
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    return ([c.strip().lower() for c in rows[0]], rows[1:]) if rows else ([], [])


def _column(header: list[str], rows: list[list[str]], column: int | None) -> dict[str, str]:
    """{file name: value} of one column (empty cells left out)."""
    name_col = next((header.index(c) for c in FILENAME_COLUMNS if c in header), None)
    if name_col is None or column is None:
        return {}
    return {r[name_col].strip(): r[column].strip() for r in rows
            if len(r) > max(name_col, column) and r[name_col].strip() and r[column].strip()}


def _metadata_controls(metadata_file: Path | None) -> dict[str, str]:
    """{file name: control name} of metadata.csv's control column (empty without one)."""
    header, rows = _metadata_rows(metadata_file)
    return _column(header, rows, next((header.index(c) for c in CONTROL_COLUMNS if c in header), None))


def _metadata_references(metadata_file: Path | None) -> dict[int, dict[str, str]]:
    """{N: {file name: reference name}} of metadata.csv's control_N columns (N >= 2)."""
    header, rows = _metadata_rows(metadata_file)
    return {n: _column(header, rows, i) for i, name in enumerate(header) if (n := _index(name)) is not None}


def _by_stem(folder: Path, root: Path | None = None) -> dict[str, Path]:
    """{relative path without suffix, lower case: file} of a control folder's images (default: control/)."""
    root = control_dir(folder) if root is None else root
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
    more_columns = _metadata_references(metadata_file)
    more_dirs = {_index(d.name): d for d in reference_dirs(folder)}
    more_stems = {n: _by_stem(folder, d) for n, d in more_dirs.items()}
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
    for image in scan.controls:
        rel = image.relative_to(folder) if image.is_relative_to(folder) else Path(image.name)
        refs: list[Path] = []
        for n in sorted(set(more_columns) | set(more_dirs)):
            named = more_columns.get(n, {}).get(rel.as_posix()) or more_columns.get(n, {}).get(image.name)
            if named:
                path = Path(named) if Path(named).is_absolute() else folder / named
                if path.is_file():
                    refs.append(path)
                else:
                    scan.missing_references.append((image, named))
                continue
            found = more_stems.get(n, {}).get(rel.with_suffix("").as_posix().lower())
            if found is not None:
                refs.append(found)
            elif n in more_dirs and any(more_stems.get(n, {})):
                scan.missing_references.append((image, f"control_{n}/{rel.with_suffix('').as_posix()}.*"))
        if refs:
            scan.references[image] = refs
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
    for image, named in scan.missing_references:
        issues.append((relative_name(image, folder), "warning", f"its reference '{named}' does not exist",
                       "Add the file, or fix the control_N column of metadata.csv; the target trains with the "
                       "references it has."))
    for refs in scan.references.values():
        for ref in refs:
            try:
                inspect_image(ref)
            except ImageReadError as exc:
                issues.append((relative_name(ref, folder), "error", f"reference image unreadable: {exc}",
                               "Re-export it as PNG or JPEG."))
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
