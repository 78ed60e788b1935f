"""Torch-free image preprocessing that reproduces timm's eval transform exactly.

timm's eval pipeline for ``crop_mode="center"`` is: resize the shorter side to
``floor(size / crop_pct)`` (PIL resampling), center-crop ``size``, scale to [0, 1], normalise by mean
and std. This module does the same with Pillow and numpy, so an app gets the numbers the model was
trained and verified with, without PyTorch.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from atexport.errors import BadInputError
from atexport.utils.images import open_image, to_rgb  # noqa: F401  (re-exported: the runtime's API)

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


def _resize_shorter(img: Image.Image, size: int, resample) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample)


def _center_crop(img: Image.Image, size: tuple[int, int], fill=0) -> Image.Image:
    th, tw = size
    w, h = img.size
    if w < tw or h < th:  # pad like torchvision (``fill``: timm's border mode pads with the mean colour)
        canvas = Image.new(img.mode, (max(w, tw), max(h, th)), fill)
        canvas.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


class Preprocessor:
    """Callable that maps PIL images (or paths) to a float32 NCHW batch.

    Args:
        config: the ``preprocess`` dict recorded in checkpoints and model metadata (input_size,
            interpolation, mean, std, crop_pct, crop_mode).
    """

    def __init__(self, config: dict):
        self.config = dict(config)
        _, self.height, self.width = (int(v) for v in config["input_size"])
        interp = str(config.get("interpolation", "bicubic"))
        if interp not in _RESAMPLE:
            raise BadInputError(f"unknown interpolation {interp!r} in the model's preprocessing metadata.")
        self.resample = _RESAMPLE[interp]
        self.crop_pct = float(config.get("crop_pct") or 0.875)
        self.crop_mode = str(config.get("crop_mode", "center"))
        self.mean = np.asarray(config["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(config["std"], dtype=np.float32).reshape(3, 1, 1)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """timm's eval resize and crop (``crop_mode`` center, squash or border), with its rounding."""
        img = to_rgb(img)
        scale = (math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct))
        if self.crop_mode == "squash":
            img = img.resize((scale[1], scale[0]), self.resample)
        elif self.crop_mode == "border":
            # timm: ResizeKeepRatio(longest=1.0), then CenterCropOrPad filled with round(255 * mean).
            img = self._resize_keep_ratio(img, scale, longest=True)
            fill = tuple(int(round(255 * float(v))) for v in self.mean.reshape(-1))
            return _center_crop(img, (self.height, self.width), fill)
        elif scale[0] == scale[1]:
            img = _resize_shorter(img, scale[0], self.resample)
        else:
            img = self._resize_keep_ratio(img, scale, longest=False)
        return _center_crop(img, (self.height, self.width))

    def _resize_keep_ratio(self, img: Image.Image, scale: tuple[int, int], longest: bool) -> Image.Image:
        """timm's ``ResizeKeepRatio``: scale by the longest (or shortest) edge's ratio, same rounding."""
        w, h = img.size
        ratio_h, ratio_w = h / scale[0], w / scale[1]
        ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
        size = (round(h / ratio), round(w / ratio))
        return img.resize((size[1], size[0]), self.resample)

    def image(self, img: Image.Image | str | os.PathLike) -> np.ndarray:
        """One image to a normalised float32 CHW array."""
        if not isinstance(img, Image.Image):
            img = open_image(img)
        a = np.asarray(self.resize_crop(img), dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return (a - self.mean) / self.std

    def __call__(self, images: Iterable) -> np.ndarray:
        arrays = [self.image(im) for im in images]
        if not arrays:
            return np.zeros((0, 3, self.height, self.width), np.float32)
        return np.ascontiguousarray(np.stack(arrays), dtype=np.float32)


def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
