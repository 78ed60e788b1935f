"""Train and eval transforms built from the backbone's recorded preprocessing.

The ``preprocess`` dict (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
``crop_mode``) is recorded in every checkpoint by :func:`atexport.models.preprocess_config`: timm's
data config of the backbone by default, or with ``preprocess: official`` (and on ``import-official``)
the official AdapterTune code's ImageNet mean/std, bilinear, crop_pct 0.875, for which the eval
transform below is exactly ``Resize(256) + CenterCrop(224) + Normalize``. Eval is timm's resize +
center crop; training is RandomResizedCrop + horizontal flip (the paper's augmentation), both through
``timm.data.create_transform`` so they match what timm users get.
"""

from __future__ import annotations

from typing import Sequence

from atexport.errors import BadInputError, require

PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _check(preprocess: dict) -> dict:
    missing = [k for k in ("input_size", "mean", "std") if k not in (preprocess or {})]
    if missing:
        raise BadInputError(f"preprocess config lacks {missing}; expected keys {PREPROCESS_KEYS}.")
    return preprocess


def _timm_data():
    return require("timm.data", "building image transforms", "torch")


def eval_transform(preprocess: dict):
    """timm's eval transform (resize, center crop, normalise) for a recorded preprocess dict."""
    pp = _check(preprocess)
    return _timm_data().create_transform(
        input_size=tuple(int(v) for v in pp["input_size"]),
        is_training=False,
        interpolation=str(pp.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
        crop_pct=float(pp.get("crop_pct", 0.875)),
        crop_mode=str(pp.get("crop_mode", "center")),
    )


def train_transform(
    preprocess: dict,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | None = None,
):
    """RandomResizedCrop (``scale``, ``ratio``) + horizontal flip (probability ``hflip``), normalised.

    Args:
        preprocess: the backbone's preprocess dict (size, interpolation, mean, std).
        scale: area range of the random crop.
        ratio: aspect-ratio range of the random crop.
        hflip: probability of a horizontal flip (0 for digits and text).
        color_jitter: strength of color jitter; ``None`` (the paper's setting) for none.
    """
    pp = _check(preprocess)
    return _timm_data().create_transform(
        input_size=tuple(int(v) for v in pp["input_size"]),
        is_training=True,
        scale=tuple(float(v) for v in scale),
        ratio=tuple(float(v) for v in ratio),
        hflip=float(hflip),
        color_jitter=color_jitter,
        interpolation=str(pp.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
    )


class TransformDataset:
    """``(transform(image), label)`` over an :class:`~atexport.data.ImageDataset` (a torch Dataset)."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label = self.dataset[i]
        return self.transform(img), label
