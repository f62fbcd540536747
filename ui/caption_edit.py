"""Caption editing logic for the Caption tab: read a folder's captions, search/replace, save.

Plain functions over rows of `[file, caption]`, so they are tested without a browser.
Saving writes metadata.csv (the old one backed up first) and/or the `.txt` files beside
the images, through `core.data.captions`; an empty caption is never written silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from core.data.captions import (CaptionFileError, read_caption_txt, read_metadata_csv, write_caption_txt,
                                write_metadata_csv)


def read_captions(folder: Path, images: list[Path], extension: str = ".txt") -> list[list[str]]:
    """[[relative name, caption]] per image: metadata.csv first, else the .txt beside it, else ''."""
    from_csv: dict[str, str] = {}
    csv_path = folder / "metadata.csv"
    if csv_path.is_file():
        try:
            from_csv = read_metadata_csv(csv_path).captions
        except CaptionFileError:
            from_csv = {}
    rows = []
    for image in images:
        name = image.relative_to(folder).as_posix()
        caption = from_csv.get(name)
        if caption is None:
            caption = from_csv.get(image.name)
        if caption is None:
            caption = read_caption_txt(image, extension) or ""
        rows.append([name, caption])
    return rows


def search_replace(rows: list[list[str]], find: str, replace: str, *, regex: bool = False,
                   whole_word: bool = False) -> tuple[list[list[str]], int]:
    """Replace `find` in every caption; returns the new rows and how many captions changed."""
    if not find:
        return [list(r) for r in rows], 0
    pattern = find if regex else re.escape(find)
    if whole_word:
        pattern = rf"\b{pattern}\b"
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"'{find}' is not a valid regular expression: {exc}") from None
    out, changed = [], 0
    for name, caption in rows:
        new = compiled.sub(replace, str(caption))
        new = re.sub(r"\s{2,}", " ", new).strip() if new != caption else new
        changed += new != caption
        out.append([name, new])
    return out, changed


@dataclass
class SaveResult:
    csv_path: Path | None = None
    csv_backup: Path | None = None
    txt_files: list[Path] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.csv_path:
            parts.append(f"saved {self.csv_path.name}" + (f" (old one backed up as {self.csv_backup.name})"
                                                          if self.csv_backup else ""))
        if self.txt_files:
            parts.append(f"wrote {len(self.txt_files)} .txt caption files")
        if self.empty:
            parts.append(f"{len(self.empty)} images have no caption and were not written: "
                         + ", ".join(self.empty[:10]))
        return "; ".join(parts).capitalize() + "." if parts else "Nothing to save."


def save_captions(folder: Path, rows: list[list[str]], *, to_csv: bool = True, to_txt: bool = False,
                  extension: str = ".txt") -> SaveResult:
    """Write the rows' non-empty captions to metadata.csv (merged, backed up) and/or .txt files."""
    result = SaveResult()
    captions = {}
    root = folder.resolve()
    for name, caption in rows:
        target = (folder / str(name)).resolve()
        if root not in target.parents or not target.is_file():
            result.empty.append(f"{name} (not an image of this folder)")
            continue
        text = " ".join(str(caption or "").split())
        if not text:
            result.empty.append(str(name))
            continue
        captions[str(name)] = text
    if not captions:
        return result
    if to_csv:
        result.csv_path = folder / "metadata.csv"
        result.csv_backup = write_metadata_csv(result.csv_path, captions, merge=True)
    if to_txt:
        for name, text in captions.items():
            result.txt_files.append(write_caption_txt(folder / name, text, extension))
    return result
