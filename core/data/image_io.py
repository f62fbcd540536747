"""Open any image a user may drop in a folder as a clean 8-bit RGB picture.

Handles grey, palette, RGBA/LA (composited on white), CMYK, 16-bit and 32-bit float
images, EXIF rotation and animated GIF/WebP (first frame). Anything that will not
open raises `ImageReadError` with a message a person can act on; callers list the
file and skip it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Pillow's own bomb limit (about 89 MP) raises only beyond twice that and merely warns
# below it; we make the rule explicit: up to 16k x 16k opens, anything larger is refused
# with a message instead of eating all memory.
MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Pillow warns about things we either check ourselves (bomb size) or that do not matter for
# training (odd EXIF, palette transparency). One filter set at import, instead of
# `warnings.catch_warnings()` around each open: that swaps the process-wide filter list and
# is not thread-safe, and the app reads images from the UI thread and the training thread.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageReadError(ValueError):
    """An image file could not be used; the message says why and what to do."""


@dataclass(frozen=True)
class ImageInfo:
    """What a folder scan needs to know about an image without decoding all of it."""

    path: Path
    width: int
    height: int
    mode: str
    format: str
    frames: int
    transparency: bool = False  # an alpha channel or a transparent palette colour (composited on white)
    bits: int = 8               # bits per channel as stored (16 for 16-bit PNG/TIFF)


def _stored_bits(image: Image.Image) -> int:
    # Pillow opens 16-bit RGB PNGs as 8-bit "RGB"; the raw mode of the first tile tells the truth.
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return 16 if image.mode.startswith("I;16") else 32
    for tile in getattr(image, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args
                                                   and isinstance(args[0], str) else "")
        if ";16" in raw:
            return 16
    return 8


def _too_large(file: Path, width: int, height: int) -> ImageReadError:
    return ImageReadError(f"{file.name}: the image is too large to open safely ({width} x {height} "
                          f"pixels). Resize it below 16384 x 16384 pixels.")


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def probe_image(path: str | Path) -> ImageInfo:
    """Read the header (size, mode, format) after applying EXIF rotation to the size."""
    file = Path(path)
    try:
        if file.stat().st_size == 0:
            raise ImageReadError(f"{file.name}: the file is empty (0 bytes). Delete it or copy it again.")
        with Image.open(file) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:  # Pillow itself only refuses beyond twice the limit
                raise _too_large(file, width, height)
            # Pillow's PNG getexif() decodes the whole image looking for a late eXIf chunk;
            # one before the pixel data (where writers put it) is already in info.
            late_exif_only = image.format == "PNG" and "exif" not in image.info
            orientation = 1 if late_exif_only else image.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            transparency = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
            return ImageInfo(file, width, height, image.mode, image.format or "?",
                             getattr(image, "n_frames", 1), transparency, _stored_bits(image))
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{file.name}: the image is too large to open safely ({exc}). "
                             "Resize it below 16384 x 16384 pixels.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{file.name}: not a readable image ({exc}). "
                             "Re-export it as PNG or JPEG, or remove it from the folder.") from exc


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit and float images into 8 bits instead of clipping them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((array - low) * scale).astype(np.uint8), "L")
    return image


def load_rgb(path: str | Path, *, draft_size: int | None = None) -> Image.Image:
    """Decode `path` fully into an RGB image (alpha composited on white).

    `draft_size` lets JPEGs decode at a reduced scale (at least that many pixels a side)
    for thumbnails and hashes; the whole file is still read, so damage is still found.
    """
    file = Path(path)
    probe_image(file)  # header errors get the friendly message
    try:
        with Image.open(file) as image:
            image.seek(0)  # animated GIF / WebP: the first frame
            if draft_size and image.format == "JPEG":
                image.draft("RGB" if image.mode == "RGB" else None, (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image) or image
            image = _to_8bit(image)
            if image.mode == "P":
                image = image.convert("RGBA")
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{file.name}: the image is too large to open safely. "
                             "Resize it below 16384 x 16384 pixels.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{file.name}: the image is damaged or truncated ({exc}). "
                             "Re-export it, or remove it from the folder.") from exc


# How a complete file of each format ends (trailing bytes some cameras add are allowed for
# by the decode fallback below).
_TAIL_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b"\x3b"}


def _tail_looks_complete(file: Path, fmt: str) -> bool:
    size = file.stat().st_size
    with open(file, "rb") as handle:
        if fmt == "WEBP":
            header = handle.read(12)
            return len(header) == 12 and int.from_bytes(header[4:8], "little") + 8 <= size
        if fmt == "BMP":
            header = handle.read(6)
            declared = int.from_bytes(header[2:6], "little") if len(header) == 6 else 0
            return 0 < declared <= size
        marker = _TAIL_MARKERS.get(fmt)
        if marker is None:
            return False
        handle.seek(max(0, size - 64))
        tail = handle.read()
        # JPEG and PNG end markers cannot occur by chance in the coded data; GIF's can.
        return tail.endswith(marker) if fmt == "GIF" else marker in tail


def check_complete(path: str | Path, info: ImageInfo | None = None) -> None:
    """Raise ImageReadError when the file is truncated or its data is damaged.

    Fast for the common case: a look at the file's last bytes (JPEG's end marker, PNG's
    IEND, GIF's trailer, the RIFF/BMP declared size). Only files that fail that look, or
    formats without one, are decoded in full to be sure.
    """
    file = Path(path)
    info = info or probe_image(file)
    if _tail_looks_complete(file, info.format):
        return
    try:
        with Image.open(file) as image:
            image.load()
    except Image.DecompressionBombError as exc:
        raise _too_large(file, info.width, info.height) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{file.name}: the image is damaged or truncated ({exc}). "
                             "Re-export it, or remove it from the folder.") from exc
