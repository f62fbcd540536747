"""The `filename` captioner: words from the file name, no model.

For people who already named their files: `red_dragon_02.png` becomes `red dragon`,
`Blue-Car (3).jpg` becomes `blue car`, `oldTownStreet.webp` becomes `old town street`.
Camera names such as `IMG_1234.jpg` hold no words and give an empty caption, which the
batch job reports instead of writing.
"""
from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Callable

from PIL import Image

# Camera / phone / screenshot prefixes that say nothing about the picture.
_CAMERA_WORDS = {"img", "dsc", "dscn", "dscf", "pxl", "pict", "dcim", "image", "photo", "screenshot",
                 "mvimg", "wp", "gopr", "copy", "final", "edit", "edited", "v", "ver"}
_COPY_MARK = re.compile(r"\s*\(\d+\)$|\s+-\s*copy$|\s+copy$", re.IGNORECASE)
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_SEPARATORS = re.compile(r"[_\-.+,;\s]+")


def caption_from_filename(path: str | Path) -> str:
    """Words from a file name: separators to spaces, numbers and camera prefixes dropped."""
    stem = Path(path).stem
    while True:  # "name (2) - Copy" -> "name"
        trimmed = _COPY_MARK.sub("", stem)
        if trimmed == stem:
            break
        stem = trimmed
    words = []
    for word in _SEPARATORS.split(_CAMEL.sub(" ", stem)):
        word = word.strip().lower()
        if not word or re.fullmatch(r"\d+|v\d+|\d+[a-c]|\d{8}t\d+", word):
            continue  # counters, dates, "v2", "02b" ("3d" stays)
        words.append(word)
    if words and all(word in _CAMERA_WORDS for word in words):
        return ""
    return " ".join(words)


class FilenameCaptioner:
    """A captioner with the same interface as the model ones, reading only file names."""

    name = "filename"
    family = "filename"
    needs_images = False

    def caption_batch(self, paths: list[Path], images: list[Image.Image] | None = None,
                      max_new_tokens: int | None = None,
                      should_stop: Callable[[], bool] | None = None) -> list[str]:
        return [caption_from_filename(path) for path in paths]

    def close(self) -> None:
        """Nothing to free."""
