"""Image files: which files are images (one list for image folders, calibration sets, parity photos and
``predict``), and opening one as 8-bit RGB with a clear error for a broken file or a decompression bomb.
Used by the data sets (training) and the runtime alike, so it sits in the ground layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from atexport.errors import BadInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path) -> bool:
    """Whether ``path`` has an image file suffix (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, LA, P, RGBA, CMYK, 16-bit, float) to 8-bit RGB.

    Transparent pixels are composited on black, as ``Image.convert("RGB")`` does; 16-bit and float
    images are rescaled to their own range first, since Pillow would clip them.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        if img.mode == "F":
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            a = a / hi * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB; a broken or non-image file is reported by path."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such image file.")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as e:  # before OSError: a small file claiming gigapixels
        size = str(e).split(",")[0].rstrip(".")
        raise BadInputError(f"{path}: refused as a possible decompression bomb ({size}); resize the image first.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadInputError(f"{path}: cannot read this image ({str(e).strip() or type(e).__name__}).") from None
    except MemoryError:
        raise BadInputError(f"{path}: cannot read this image (it needs more memory than there is).") from None
