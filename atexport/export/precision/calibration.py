"""Calibration sets for INT8 quantization, and the cache of their results.

A calibration set is data (``calibration/<name>.yaml``): where the images come from (``source``:
``digits`` — scikit-learn's bundled 8x8 digits, upscaled to RGB, offline, split as
:mod:`atexport.data` splits them for training, so a digits model is never calibrated on its test
images; ``photos`` — the photographs scikit-image ships; ``folder`` — image files under ``path``, class subfolders allowed, as in an
ImageFolder/ImageNet layout; ``dataset`` — ``atexport.data.load_dataset``), which ``split``, how many
images (``count``) and the ``seed`` of the selection. ``--calib`` also takes a YAML path or a folder of
images directly. Images always go through the *model's own* preprocessing (the ``preprocess`` block of
its metadata), so INT8 scales are measured on what the model will see.

The result of a calibration run (the activation ranges ONNX Runtime's calibrator measured) is cached in
a JSON file keyed by the FP32 model's content hash, the hash of the preprocessed calibration batch and
the calibration settings. A later run with the same model and the same images reuses it; a cache made
for another model, other images or other settings is never reused (it is recomputed and replaced).
The per-layer quantization sensitivity that INT8 mixed precision measures (it depends on those ranges)
is stored in the same file under its own settings (:func:`read_sensitivity`, :func:`write_sensitivity`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from atexport import configs
from atexport.errors import AtexportError, BadInputError, MissingDependencyError
from atexport.utils.images import IMAGE_SUFFIXES
from atexport.utils.io import canonical_json

SOURCES = ("digits", "photos", "folder", "dataset")
CACHE_FORMAT = "atexport.calibration-cache"
CACHE_VERSION = 1


class CalibrationWarning(UserWarning):
    """A calibration set that works but is likely to give poor INT8 scales (e.g. too few images)."""


@dataclass
class CalibrationSet:
    """Where calibration images come from and how many are drawn.

    Attributes:
        name: label used in reports and metadata.
        source: ``digits``, ``photos``, ``folder`` or ``dataset``.
        count: images drawn (at most; a smaller source gives all it has).
        seed: seed of the random selection (selection is without replacement).
        split: ``train``/``test`` for ``digits`` and ``dataset``.
        path: folder of images (``folder``); relative paths are taken from the YAML file's folder,
            then from the working directory.
        dataset: data set name for ``source: dataset``.
        min_images: below this many images a :class:`CalibrationWarning` is issued.
        holdout: in-domain images kept out of calibration, on which the precision parity check judges the
            model's decisions (:meth:`split_indices`; a small source keeps a quarter of its images out).
        source_file: the YAML file the definition came from, if any.
    """

    name: str
    source: str
    count: int = 256
    seed: int = 0
    split: str = "train"
    path: str | None = None
    dataset: str | None = None
    min_images: int = 64
    holdout: int = 128
    source_file: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise BadInputError(f"calibration set {self.name!r}: source {self.source!r} is not one of {SOURCES}.")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise BadInputError(f"calibration set {self.name!r}: count must be a positive integer, got {self.count!r}.")
        if not isinstance(self.holdout, int) or isinstance(self.holdout, bool) or self.holdout < 0:
            raise BadInputError(f"calibration set {self.name!r}: holdout must be an integer >= 0, got {self.holdout!r}.")
        if self.source == "folder" and not self.path:
            raise BadInputError(f"calibration set {self.name!r}: source 'folder' needs a 'path'.")
        if self.source == "dataset" and not self.dataset:
            raise BadInputError(f"calibration set {self.name!r}: source 'dataset' needs a 'dataset' name.")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}) or k == "path"}

    # ----------------------------------------------------------------------------------------------
    def split_indices(self, pool: int) -> tuple[list[int], list[int]]:
        """``(calibration, held-out)`` indices into a source of ``pool`` images, disjoint and seeded.

        The calibration images are the first ``count`` of a seeded permutation (as before held-out images
        existed, so calibration caches stay valid); the held-out images are the next ``holdout``. A source
        too small for both keeps a quarter of its images (at most ``holdout``) out of calibration instead.
        """
        order = [int(i) for i in np.random.default_rng(self.seed).permutation(pool)]
        if pool >= self.count + self.holdout:
            calib, held = order[: self.count], order[self.count : self.count + self.holdout]
        else:
            n_held = min(self.holdout, pool // 4)
            calib, held = order[: min(self.count, pool - n_held)], order[pool - n_held :] if n_held else []
        return sorted(calib), sorted(held)

    def images(self, part: str = "calibration") -> list:
        """The selected images, as RGB PIL images (deterministic for a given definition).

        Args:
            part: ``calibration`` (the images the ranges are measured on) or ``holdout`` (in-domain images
                never used to calibrate: what the precision parity check judges).
        """
        if part not in ("calibration", "holdout"):
            raise BadInputError(f"calibration set part {part!r}: expected 'calibration' or 'holdout'.")
        loader = {"digits": _digits, "photos": _photos, "folder": _folder, "dataset": _dataset}[self.source]
        n, get = loader(self)
        calib, held = self.split_indices(n)
        return [get(i) for i in (calib if part == "calibration" else held)]

    def batch(self, preprocess: dict, part: str = "calibration") -> np.ndarray:
        """The selected images through the model's preprocessing: a float32 NCHW batch.

        Warns (:class:`CalibrationWarning`) when fewer than ``min_images`` calibration images are available.
        A held-out part may be empty (a ``(0, C, H, W)`` batch).
        """
        from atexport.runtime.preprocess import Preprocessor

        imgs = self.images(part)
        if part == "holdout":
            size = [int(v) for v in preprocess["input_size"]]
            return Preprocessor(preprocess)(imgs) if imgs else np.zeros((0, *size), np.float32)
        if not imgs:
            raise BadInputError(f"calibration set {self.name!r} yielded no images.")
        if len(imgs) < self.min_images:
            warnings.warn(
                f"calibration set {self.name!r} has only {len(imgs)} images (fewer than {self.min_images}); "
                "INT8 scales measured on so few images may clip real inputs. Use a few hundred images from "
                "the task's own data (--calib DIR).",
                CalibrationWarning,
                stacklevel=2,
            )
        return Preprocessor(preprocess)(imgs)


def _digits(cs: CalibrationSet):
    """scikit-learn's digits with *the training data's split* (:mod:`atexport.data`): ``train`` is the pool
    ``atexport train --dataset digits`` trains and validates on, ``test`` its fixed test split, so the
    calibration images of a digits model are never the images it is scored on."""
    if cs.split not in ("train", "test"):
        raise BadInputError(f"calibration set {cs.name!r}: digits has splits 'train' and 'test', not {cs.split!r}.")
    from atexport.data import dataset_entry

    entry, _ = dataset_entry("digits")
    # 8x8 -> 64x64 (as training does) so the model's own resize sees an image, not a few pixels.
    ds = entry.build(cs.split, Path("."), False, size=int(cs.extra.get("size", 64)))
    return len(ds), lambda i: ds[i][0]


def _photos(cs: CalibrationSet):
    from atexport.parity import sample_images

    imgs = sample_images()
    return len(imgs), imgs.__getitem__


def _folder_path(cs: CalibrationSet) -> Path:
    p = Path(os.path.expanduser(str(cs.path)))
    if not p.is_absolute() and cs.source_file:
        beside = Path(cs.source_file).parent / p
        if beside.is_dir():
            return beside
    return p


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively: class subfolders are fine), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder(cs: CalibrationSet):
    from atexport.utils.images import open_image

    folder = _folder_path(cs)
    if not folder.is_dir():
        raise BadInputError(f"calibration set {cs.name!r}: image folder {folder} does not exist.")
    files = list_images(folder)
    if not files:
        raise BadInputError(f"calibration set {cs.name!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}.")
    return len(files), lambda i: open_image(files[i])


def _dataset(cs: CalibrationSet):
    try:
        from atexport.data import load_dataset
    except ImportError:
        raise MissingDependencyError(
            f"calibration set {cs.name!r} uses source 'dataset', but this atexport has no atexport.data module; "
            "calibrate on a folder of images instead (--calib DIR)."
        ) from None
    ds = load_dataset(cs.dataset, cs.split)
    return len(ds), lambda i: ds[i][0].convert("RGB")


def available_sets() -> list[str]:
    return configs.available("calibration")


def load_calibration_set(
    spec: str | os.PathLike | CalibrationSet | dict,
    *,
    count: int | None = None,
    seed: int | None = None,
    min_images: int | None = None,
    holdout: int | None = None,
) -> CalibrationSet:
    """Resolve ``--calib``: a set name in ``calibration/``, a YAML path, a folder of images, or a dict.

    Args:
        spec: the calibration set.
        count: override the number of images.
        seed: override the selection seed.
        min_images: override the warning threshold.
        holdout: override the number of held-out images (0: judge precision on photos and ``--images`` only).
    """
    if isinstance(spec, CalibrationSet):
        cs = CalibrationSet(**{**asdict(spec)})
    elif isinstance(spec, dict):
        d = {k: v for k, v in spec.items() if not k.startswith("_")}
        d.setdefault("name", "custom")
        cs = _from_dict(d, None)
    else:
        p = Path(os.path.expanduser(str(spec)))
        bare = isinstance(spec, str) and os.sep not in spec and "/" not in spec and not spec.endswith((".yaml", ".yml"))
        if p.is_dir() and bare and spec in available_sets():
            raise BadInputError(
                f"--calib {spec} is both a calibration set in calibration/ and a folder here; say which: "
                f"--calib ./{spec} for the folder, or --calib {configs.config_dir('calibration') / (spec + '.yaml')} for the set."
            )
        if p.is_dir():
            cs = CalibrationSet(name=p.name or str(p), source="folder", path=str(p.resolve()))
        else:
            try:
                data = configs.load("calibration", spec)
            except BadInputError as e:
                raise BadInputError(f"--calib {spec}: {e} It may also be a folder of images.") from None
            src = data.pop("_source", None)
            data.setdefault("name", Path(src).stem if src else str(spec))
            cs = _from_dict(data, src)
    if count is not None:
        cs.count = int(count)
    if seed is not None:
        cs.seed = int(seed)
    if min_images is not None:
        cs.min_images = int(min_images)
    if holdout is not None:
        cs.holdout = holdout
    cs.__post_init__()
    return cs


def _from_dict(d: dict, source_file: str | None) -> CalibrationSet:
    known = set(CalibrationSet.__dataclass_fields__) - {"extra", "source_file"}
    extra = {k: v for k, v in d.items() if k not in known}
    try:
        return CalibrationSet(**{k: v for k, v in d.items() if k in known}, extra=extra, source_file=source_file)
    except TypeError as e:
        raise BadInputError(f"calibration set {source_file or d}: {e}.") from None


# --------------------------------------------------------------------------------------------------
# Cache of calibration results
# --------------------------------------------------------------------------------------------------


def model_hash(model) -> str:
    """sha256 of an ONNX model's computation (graph, weights, opsets), ignoring its metadata and doc.

    Metadata edits (parity results, task names) do not change what calibration measures, so they do
    not invalidate a cache; any change to a node or a weight does.
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.metadata_props[:]
    m.doc_string = ""
    m.graph.doc_string = ""
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


def data_hash(batch: np.ndarray) -> str:
    """sha256 of a preprocessed calibration batch (shape, dtype and values)."""
    a = np.ascontiguousarray(batch)
    h = hashlib.sha256()
    h.update(str((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class CacheKey:
    """What a calibration result depends on."""

    model_sha256: str
    data_sha256: str
    settings: dict

    def matches(self, other: dict) -> tuple[bool, str]:
        """Whether a cache document was made under this key; else the reason it was not."""
        if other.get("format") != CACHE_FORMAT or other.get("format_version") != CACHE_VERSION:
            return False, "not an atexport calibration cache of this version"
        if other.get("model_sha256") != self.model_sha256:
            return False, f"made for another model ({str(other.get('model_sha256'))[:12]} != {self.model_sha256[:12]})"
        if other.get("data_sha256") != self.data_sha256:
            return False, "made on other calibration images"
        if canonical_json(other.get("settings")) != canonical_json(self.settings):
            return False, "made with other calibration settings"
        return True, "same model, images and settings"


def _read_cache_doc(path: Path, key: CacheKey) -> tuple[dict | None, str]:
    """A cache document made under ``key``, or ``None`` and why (a damaged cache is just recomputed)."""
    if not path.is_file():
        return None, "no cache yet"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"unreadable cache ({str(e)[:120]})"
    if not isinstance(doc, dict):
        return None, "unreadable cache (not a JSON object)"
    ok, why = key.matches(doc)
    return (doc, why) if ok else (None, why)


def read_cache(path: str | os.PathLike, key: CacheKey) -> tuple[dict | None, str]:
    """The cached tensor ranges if ``path`` holds a cache made under ``key``; else ``None`` and why."""
    doc, why = _read_cache_doc(Path(path), key)
    if doc is None:
        return None, why
    ranges = doc.get("ranges")
    if not isinstance(ranges, dict) or not ranges:
        return None, "unreadable cache (no ranges)"
    return ranges, why


def write_cache(path: str | os.PathLike, key: CacheKey, ranges: dict, calibration: dict, seconds: float) -> Path:
    """Write a calibration cache atomically."""
    from atexport.utils.io import atomic_write_json

    doc = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_VERSION,
        "model_sha256": key.model_sha256,
        "data_sha256": key.data_sha256,
        "settings": key.settings,
        "calibration": calibration,
        "seconds": round(float(seconds), 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ranges": ranges,
    }
    return atomic_write_json(path, doc)


def read_sensitivity(path: str | os.PathLike, key: CacheKey, settings: dict) -> tuple[dict | None, str]:
    """The per-layer sensitivity stored in a calibration cache made under ``key`` with these sensitivity
    ``settings``; else ``None`` and why. (Sensitivity depends on the ranges, so it lives beside them.)"""
    doc, why = _read_cache_doc(Path(path), key)
    if doc is None:
        return None, why
    sens = doc.get("sensitivity")
    if not isinstance(sens, dict):
        return None, "no sensitivity in the cache yet"
    if canonical_json(sens.get("settings")) != canonical_json(settings):
        return None, "sensitivity measured with other settings"
    return sens.get("result"), "same model, images and settings"


def write_sensitivity(path: str | os.PathLike, key: CacheKey, settings: dict, result: dict) -> bool:
    """Store a sensitivity result in the calibration cache made under ``key`` (atomically); ``False`` when
    there is no such cache to add it to."""
    from atexport.utils.io import atomic_write_json

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not key.matches(doc)[0]:
        return False
    doc["sensitivity"] = {"settings": settings, "result": as_jsonable(result)}
    atomic_write_json(path, doc)
    return True


def default_cache_path(output: str | os.PathLike) -> Path:
    """``<output stem>.calib.json`` beside the INT8 model."""
    p = Path(output)
    return p.with_name(p.stem + ".calib.json")


def describe(cs: CalibrationSet, n_images: int, data_sha: str) -> dict:
    """What goes into the INT8 model's metadata about its calibration."""
    d = cs.to_dict()
    d["images"] = int(n_images)
    d["data_sha256"] = data_sha
    return d


def split_batches(batch: np.ndarray, size: int) -> Sequence[np.ndarray]:
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def as_jsonable(obj: Any):
    """numpy scalars/arrays -> plain Python, for the cache."""
    if isinstance(obj, dict):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def holdout_for(meta, say=None) -> tuple[np.ndarray | None, str | None]:
    """The held-out images of the calibration set an INT8 model's metadata records (through the model's
    preprocessing) and the set's name, so every later check of that model (OpenVINO, TensorRT, a re-check)
    judges it on the same in-domain images; ``(None, None)`` for a model without one, or when the set can
    no longer be read (a moved folder: said through ``say``, and the photos are judged instead)."""
    rec = ((getattr(meta, "extra", None) or {}).get("precision") or {}).get("calibration") or {}
    if not isinstance(rec, dict) or rec.get("source") in (None, "array") or not rec.get("held_out"):
        return None, None
    known = set(CalibrationSet.__dataclass_fields__) - {"extra", "source_file"}
    spec = {**(rec.get("extra") or {}), **{k: v for k, v in rec.items() if k in known}}
    try:
        cs = load_calibration_set(spec)
        if rec.get("source_file"):
            cs.source_file = rec["source_file"]
        return cs.batch(meta.preprocess, "holdout"), cs.name
    except AtexportError as e:
        if say:
            say(f"the held-out images of calibration set {rec.get('name')!r} cannot be read ({e}); judging on photos.")
        return None, None
