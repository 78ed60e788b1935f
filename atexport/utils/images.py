"""Which files are images: one list for image folders, calibration sets, parity photos and ``predict``."""

from __future__ import annotations

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path) -> bool:
    """Whether ``path`` has an image file suffix (case-insensitive)."""
    from pathlib import Path

    return Path(path).suffix.lower() in IMAGE_SUFFIXES
