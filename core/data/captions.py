"""Captions on disk: metadata.csv (`filename,prompt`) and kohya-style `.txt` files.

Reading tolerates what users' files contain: a BOM, Windows line ends, quotes and
commas inside prompts, Chinese text, non-UTF-8 bytes (read as GBK / Latin-1 with a
warning). Writing always goes through a backup and an atomic rename, so an existing
metadata.csv is never lost.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import atomic_write_text, backup_file

FILENAME_COLUMNS = ("filename", "file_name", "file", "image", "path")
PROMPT_COLUMNS = ("prompt", "caption", "text")


class CaptionFileError(ValueError):
    """metadata.csv cannot be used; the message names the file, line and what is expected."""


@dataclass
class MetadataRead:
    """The rows of a metadata.csv plus what was odd about it."""

    captions: dict[str, str] = field(default_factory=dict)  # file name as written -> prompt
    warnings: list[str] = field(default_factory=list)
    encoding: str = "utf-8"
    lines: dict[str, int] = field(default_factory=dict)  # file name -> line of its (last) row
    duplicates: list[tuple[int, str]] = field(default_factory=list)  # (line, name) of repeated rows


def decode_text(data: bytes, name: str) -> tuple[str, str, list[str]]:
    """Decode bytes as UTF-8 (BOM allowed), else GB18030, else Latin-1; returns text, encoding, warnings."""
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        warnings = [] if encoding == "utf-8-sig" else [
            f"{name} is not UTF-8; read it as {encoding.upper()}. Save it as UTF-8 to be sure."]
        return text, encoding, warnings
    return data.decode("latin-1"), "latin-1", [
        f"{name} is not UTF-8; some characters may be wrong. Save it as UTF-8."]


def read_metadata_csv(path: str | Path) -> MetadataRead:
    """Read `filename,prompt` rows. Raises CaptionFileError when the columns are missing."""
    file = Path(path)
    text, encoding, warnings = decode_text(file.read_bytes(), file.name)
    result = MetadataRead(warnings=warnings, encoding=encoding)
    rows = list(csv.reader(io.StringIO(text.replace("\r\n", "\n").replace("\r", "\n"))))
    rows = [(number, row) for number, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]
    if not rows:
        raise CaptionFileError(f"{file}: the file is empty. Expected a header line 'filename,prompt'.")
    header = [cell.strip().lower() for cell in rows[0][1]]
    name_col = next((header.index(c) for c in FILENAME_COLUMNS if c in header), None)
    prompt_col = next((header.index(c) for c in PROMPT_COLUMNS if c in header), None)
    if name_col is None or prompt_col is None:
        raise CaptionFileError(
            f"{file}, line {rows[0][0]}: expected the columns 'filename,prompt' but found "
            f"{','.join(rows[0][1])!r}. Put a header line 'filename,prompt' first.")
    for number, row in rows[1:]:
        if len(row) <= max(name_col, prompt_col):
            result.warnings.append(f"{file.name}, line {number}: expected 2 columns (filename,prompt), "
                                   f"found {len(row)}; the row was skipped.")
            continue
        name = row[name_col].strip()
        prompt = row[prompt_col].strip()
        if not name:
            result.warnings.append(f"{file.name}, line {number}: no file name; the row was skipped.")
            continue
        if name in result.captions:
            result.duplicates.append((number, name))
            if result.captions[name] != prompt:
                result.warnings.append(f"{file.name}, line {number}: {name} is listed twice; "
                                       "the last caption wins.")
        result.captions[name] = prompt
        result.lines[name] = number
    return result


def format_metadata_csv(captions: dict[str, str]) -> str:
    """`filename,prompt` CSV text with proper quoting (commas, quotes, new lines)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(["filename", "prompt"])
    for name, prompt in captions.items():
        writer.writerow([name, prompt])
    return buffer.getvalue()


def write_metadata_csv(path: str | Path, captions: dict[str, str], *, merge: bool = True) -> Path | None:
    """Write captions to metadata.csv atomically, backing up the old file first.

    With `merge`, rows of the existing file for images not in `captions` are kept.
    Returns the backup path (None when there was no previous file).
    """
    file = Path(path)
    rows: dict[str, str] = {}
    if merge and file.is_file():
        try:
            rows.update(read_metadata_csv(file).captions)
        except CaptionFileError:
            pass  # an unreadable old file is still backed up below, never silently dropped
    rows.update(captions)
    backup = backup_file(file)
    atomic_write_text(file, format_metadata_csv(rows))
    return backup


def caption_txt_path(image_path: str | Path, extension: str = ".txt") -> Path:
    image = Path(image_path)
    ext = extension if extension.startswith(".") else f".{extension}"
    return image.with_suffix(ext)


def read_caption_txt(image_path: str | Path, extension: str = ".txt") -> str | None:
    """The kohya-style caption beside an image, or None when there is no file."""
    return read_caption_txt_checked(image_path, extension)[0]


def read_caption_txt_checked(image_path: str | Path, extension: str = ".txt") -> tuple[str | None, list[str]]:
    """Like `read_caption_txt`, plus the warnings about the file (not UTF-8, ...)."""
    file = caption_txt_path(image_path, extension)
    if not file.is_file():
        return None, []
    text, _, warnings = decode_text(file.read_bytes(), file.name)
    return " ".join(text.strip().splitlines()).strip(), warnings


def write_caption_txt(image_path: str | Path, caption: str, extension: str = ".txt",
                      *, backup: bool = True) -> Path:
    """Write a caption beside its image atomically (the old one backed up when it differs)."""
    file = caption_txt_path(image_path, extension)
    if backup and file.is_file() and read_caption_txt(image_path, extension) != caption.strip():
        backup_file(file)
    return atomic_write_text(file, caption.strip() + "\n")
