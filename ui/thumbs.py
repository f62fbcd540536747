"""Small thumbnails of data set images, cached under .cache/ui/thumbs by path, size and mtime.

The gallery shows these instead of the originals: a folder of 20 MB photos stays fast,
and the page never needs to read files outside the project's cache folder.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ui.state import CACHE_DIR

THUMB_SIDE = 256


def thumbnail(path: str | Path, side: int = THUMB_SIDE) -> Path | None:
    """A cached WebP thumbnail of `path` (a video clip: its first frame), or None when it cannot be read."""
    from core.data.image_io import load_rgb
    from core.data.video_io import VIDEO_EXTENSIONS, read_frames

    source = Path(path)
    try:
        info = source.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{source.resolve()}|{info.st_size}|{info.st_mtime_ns}|{side}".encode()).hexdigest()
    target = CACHE_DIR / "thumbs" / f"{key[:2]}" / f"{key}.webp"
    if target.is_file():
        return target
    try:
        if source.suffix.lower() in VIDEO_EXTENSIONS:
            image = read_frames(source, (0,))[0]
        else:
            image = load_rgb(source, draft_size=side)
    except Exception:  # noqa: BLE001 - an unreadable image has no thumbnail; the health check says why
        return None
    image.thumbnail((side, side))
    target.parent.mkdir(parents=True, exist_ok=True)
    from core.atomic import atomic_path

    with atomic_path(target) as tmp:
        image.save(tmp, format="WEBP", quality=80)
    return target


STRIP_GAP = 8


def strip_thumbnail(paths: list[str | Path], side: int = THUMB_SIDE) -> Path | None:
    """One cached WebP of several images' thumbnails side by side, in order (an edit target's references, then
    the target), each fitted into `side` x `side`; None when any cannot be read."""
    from PIL import Image

    thumbs = [thumbnail(p, side) for p in paths]
    if not thumbs or any(t is None for t in thumbs):
        return None
    key = hashlib.sha1("|".join(str(t) for t in thumbs).encode()).hexdigest()
    target = CACHE_DIR / "thumbs" / f"{key[:2]}" / f"strip-{key}.webp"
    if target.is_file():
        return target
    images = [Image.open(t).convert("RGB") for t in thumbs]
    strip = Image.new("RGB", (sum(i.width for i in images) + STRIP_GAP * (len(images) - 1),
                              max(i.height for i in images)), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, (strip.height - image.height) // 2))
        x += image.width + STRIP_GAP
    from core.atomic import atomic_path

    with atomic_path(target) as tmp:
        strip.save(tmp, format="WEBP", quality=80)
    return target
