"""The inputs every parity check sees: real photographs through the model's own preprocessing, and seeded
random inputs.

Real photos come from scikit-image's bundled samples (several sizes, aspect ratios and modes: RGB, L,
RGBA, P), plus any images the user adds; no download is ever needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from atexport.errors import BadInputError, MissingDependencyError
from atexport.utils.images import IMAGE_SUFFIXES



_SKIMAGE_SAMPLES = (
    ("astronaut", None, None),  # 512x512 RGB
    ("chelsea", None, None),  # 300x451 RGB
    ("coffee", None, None),  # 400x600 RGB
    ("camera", None, None),  # 512x512 L
    ("rocket", None, None),  # 427x640 RGB
    ("coins", None, None),  # 303x384 L
    ("hubble_deep_field", (300, 400), None),  # crop of 872x1000 RGB
    ("immunohistochemistry", None, None),  # 512x512 RGB
    ("colorwheel", None, None),  # 370x371 RGB
    ("logo", None, None),  # 500x500 RGBA
    ("page", None, None),  # 191x384 L, smaller than most crops
    ("astronaut", None, "RGBA"),
    ("chelsea", None, "P"),
)


def sample_images(limit: int | None = None) -> list:
    """Real photographs shipped with scikit-image, as PIL images of several sizes and modes.

    Each image carries its sample name in ``image.info["name"]``. Samples that this scikit-image
    version would have to download are skipped.

    Args:
        limit: return at most this many images.

    Raises:
        MissingDependencyError: scikit-image is not installed (``--images DIR`` is the alternative).
    """
    try:
        from skimage import data
    except ImportError:
        raise MissingDependencyError(
            "scikit-image is not installed; its bundled photos are the real images atexport checks parity on. "
            "Install it with: pip install scikit-image, or pass your own images with --images DIR."
        ) from None
    from PIL import Image

    out = []
    for name, crop, mode in _SKIMAGE_SAMPLES:
        if limit is not None and len(out) >= limit:
            break
        try:
            a = getattr(data, name)()
        except Exception:  # not bundled in this version (needs pooch / a download): skip it
            continue
        if crop:
            a = a[: crop[0], : crop[1]]
        img = Image.fromarray(a)
        if mode:
            img = img.convert(mode)
        img.info["name"] = name if not mode else f"{name}-{mode}"
        out.append(img)
    return out


def load_images(source: str | os.PathLike | Iterable, limit: int | None = None) -> list:
    """User images for parity: a folder (its image files, sorted), or a list of paths or PIL images.

    Raises:
        BadInputError: the folder is missing or holds no image, or a file cannot be read as an image.
    """
    from PIL import Image

    from atexport.utils.images import open_image

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise BadInputError(f"--images {folder}: no such folder.")
        items = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not items:
            raise BadInputError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it.")
    else:
        items = list(source)
    if limit is not None:
        items = items[:limit]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item)
        else:
            img = open_image(item)
            img.info["name"] = Path(item).name
            out.append(img)
    return out


def photo_batch(preprocess: dict, extra=None, max_images: int | None = None, samples: bool = True) -> np.ndarray:
    """Sample photos (and optional user images) through the model's own preprocessing.

    Args:
        preprocess: the model's preprocess dict (as in checkpoints and metadata).
        extra: a folder or list of images added after the samples (``--images``).
        max_images: cap on the number of images in all.
        samples: include scikit-image's photos (turn off to check on user images only).

    Returns:
        A float32 NCHW batch.
    """
    from atexport.runtime.preprocess import Preprocessor

    images = []
    if extra is not None:
        images += load_images(extra, limit=max_images)
    if samples:
        room = None if max_images is None else max(max_images - len(images), 0)
        images = sample_images(limit=room) + images
    if not images:
        raise BadInputError("no images to check parity on (no scikit-image samples and no --images).")
    return Preprocessor(preprocess)(images)


def random_batch(n: int, input_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """``n`` seeded standard-normal inputs of shape ``input_shape`` (C, H, W): far from any photo, so
    they exercise value ranges real images do not reach."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *[int(v) for v in input_shape])).astype(np.float32)

