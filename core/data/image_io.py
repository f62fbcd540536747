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


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def probe_image(path: str | Path) -> ImageInfo:
    """Read the header (size, mode, format) after applying EXIF rotation to the size."""
    file = Path(path)
    try:
        if file.stat().st_size == 0:
            raise ImageReadError(f"{file.name}: the file is empty (0 bytes). Delete it or copy it again.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(file) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                return ImageInfo(file, width, height, image.mode, image.format or "?",
                                 getattr(image, "n_frames", 1))
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


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` fully into an RGB image (alpha composited on white)."""
    file = Path(path)
    probe_image(file)  # header errors get the friendly message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(file) as image:
                image.seek(0)  # animated GIF / WebP: the first frame
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
