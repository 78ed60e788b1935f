"""Parity of an exported artifact against its PyTorch reference, on real photos and random inputs.

Every export (ONNX here; FP16, INT8 and TensorRT in later stages) runs the same check: the reference
runner and the candidate runner see the same batches of real photographs (the samples scikit-image
ships, plus any images the user adds, through the model's own preprocessing) and of seeded random
inputs, at each batch size asked for; the logits are compared with :func:`atexport.verify.compare.compare`
against the tolerances of the artifact's precision (``export_configs/tolerances.yaml``). A row per
(input kind, batch size) comes back; :func:`~atexport.verify.compare.require_passed` turns any failing
row into a :class:`~atexport.errors.ParityError`.

This module imports neither torch nor onnxruntime: the runners bring their own backends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from atexport.errors import BadInputError, MissingDependencyError
from atexport.runtime.base import Runner
from atexport.verify.compare import ParityResult, Tolerance, compare, load_tolerances

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# scikit-image's bundled samples: (loader name, crop or None, mode conversion or None). Several sizes,
# aspect ratios and modes (RGB, L, RGBA, P), so resizing, cropping and mode handling are exercised too.
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

    from atexport.runtime.preprocess import open_image

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


def run_batched(runner: Runner, inputs: np.ndarray, batch_size: int, feeds: dict | None = None) -> np.ndarray:
    """Run ``inputs`` through ``runner`` in chunks of exactly ``batch_size`` (the last one padded by
    repeating its final sample, then trimmed), so fixed-batch artifacts can run any count."""
    outs = []
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        outs.append(runner.infer(chunk, **(feeds or {}))[:n])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def check_parity(
    reference: Runner,
    candidate: Runner,
    images: np.ndarray | None,
    precision: str = "fp32",
    *,
    random_inputs: int = 8,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    batch_sizes: Sequence[int] = (1,),
    tolerance: Tolerance | None = None,
    tolerances: str = "tolerances",
    feeds: dict | None = None,
    label: str = "",
) -> list[ParityResult]:
    """Compare ``candidate`` with ``reference`` on photos and seeded random inputs, per batch size.

    Args:
        reference: usually a :class:`~atexport.runtime.torch.TorchRunner` on the FP32 model.
        candidate: the artifact's runner (ONNX Runtime, TensorRT...).
        images: preprocessed photos, float32 NCHW (see :func:`photo_batch`), or ``None``.
        precision: which row of the tolerance table applies (``fp32``, ``fp16``, ``int8``).
        random_inputs: how many seeded random inputs to add (0: none).
        input_shape: (C, H, W) of the random inputs; taken from ``images`` when omitted.
        seed: seed of the random inputs.
        batch_sizes: run every input set at each of these batch sizes (one result row each); a
            dynamic-batch artifact is checked at several, a fixed-batch one at its own.
        tolerance: explicit limits; overrides the table.
        tolerances: name of the tolerance table in ``export_configs/``.
        feeds: extra named inputs given to both runners with every batch.
        label: prefix of the row names.

    Returns:
        One :class:`ParityResult` per (input set, batch size).
    """
    if tolerance is None:
        table = load_tolerances(tolerances)
        if precision not in table:
            raise BadInputError(f"no tolerances for precision {precision!r} in {tolerances}.yaml; have {sorted(table)}.")
        tolerance = table[precision]
    sets = []
    if images is not None and len(images):
        sets.append(("photos", np.ascontiguousarray(images, dtype=np.float32)))
        input_shape = input_shape or images.shape[1:]
    if random_inputs:
        if input_shape is None:
            raise BadInputError("check_parity needs input_shape (C, H, W) for random inputs when no images are given.")
        sets.append(("random", random_batch(random_inputs, input_shape, seed)))
    if not sets:
        raise BadInputError("check_parity has nothing to compare: no images and random_inputs=0.")
    results = []
    prefix = f"{label} " if label else ""
    for bs in batch_sizes:
        bs = int(bs)
        if bs < 1:
            raise BadInputError(f"parity batch size must be >= 1, got {bs}.")
        for kind, x in sets:
            ref = run_batched(reference, x, bs, feeds)
            cand = run_batched(candidate, x, bs, feeds)
            results.append(compare(ref, cand, tolerance, name=f"{prefix}{kind} (batch {bs})"))
    return results
