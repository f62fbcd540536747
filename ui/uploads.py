"""Put uploaded files into a new data set folder under data/, safely.

Uploaded names are reduced to a plain file name (no folders, no `..`, no odd
characters); a zip is unpacked member by member and a member whose path would land
outside the target folder (zip-slip: `../x`, `/etc/x`, `C:\\x`) or that is a link is
refused and reported, never written. Existing files are never overwritten: a clash
gets a numbered name.
"""
from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ui.state import safe_name

ALLOWED_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".txt", ".csv",
                    ".jsonl", ".json", ".caption"}
MAX_ZIP_BYTES = 20 * 1024**3  # refuse zip bombs that would fill the disk


@dataclass
class ImportResult:
    saved: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: why"


def _unique(target: Path) -> Path:
    if not target.exists():
        return target
    for n in range(1, 10000):
        candidate = target.with_name(f"{target.stem}_{n}{target.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"too many files named like {target.name}")


def safe_member_path(member: str, folder: Path) -> Path | None:
    """Where a zip member may go inside `folder`, or None when it would escape it."""
    text = member.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    clean = [safe_name(p, "_") for p in parts]
    target = (folder.joinpath(*clean)).resolve()
    root = folder.resolve()
    if root != target and root not in target.parents:
        return None
    return target


def _extract_zip(zip_path: Path, folder: Path, result: ImportResult) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        total = sum(info.file_size for info in archive.infolist())
        if total > MAX_ZIP_BYTES:
            result.skipped.append(f"{zip_path.name}: unpacks to {total / 1024**3:.1f} GB, too large.")
            return
        for info in archive.infolist():
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                result.skipped.append(f"{info.filename}: a link inside the zip, not extracted.")
                continue
            target = safe_member_path(info.filename, folder)
            if target is None:
                result.skipped.append(f"{info.filename}: its path points outside the data set folder, refused.")
                continue
            if "__MACOSX" in Path(info.filename).parts or Path(info.filename).name.startswith("._"):
                continue
            if target.suffix.lower() not in ALLOWED_SUFFIXES:
                result.skipped.append(f"{info.filename}: not an image, caption or data file.")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target = _unique(target)
            with archive.open(info) as source, open(target, "xb") as sink:
                shutil.copyfileobj(source, sink)
            result.saved.append(target)


def import_files(paths: list[str | Path], folder: Path) -> ImportResult:
    """Copy uploaded files (and the contents of uploaded zips) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    result = ImportResult()
    for item in paths:
        source = Path(item)
        name = safe_name(source.name)
        if source.suffix.lower() == ".zip":
            try:
                _extract_zip(source, folder, result)
            except zipfile.BadZipFile:
                result.skipped.append(f"{name}: not a readable zip file.")
            continue
        if source.suffix.lower() not in ALLOWED_SUFFIXES:
            result.skipped.append(f"{name}: not an image, caption or data file.")
            continue
        target = _unique(folder / name)
        shutil.copyfile(source, target)
        result.saved.append(target)
    return result
