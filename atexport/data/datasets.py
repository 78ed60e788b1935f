"""Image classification data sets behind one interface, found through a registry.

Every data set is an :class:`ImageDataset`: indexable ``(PIL RGB image, int label)`` samples with
``class_names``, ``targets`` (labels known without decoding images) and ``path(i)`` for messages.
Transforms are applied separately (:mod:`atexport.data.transforms`), because verification feeds the
same PIL images to PyTorch and to the torch-free preprocessing.

Data sets register themselves with :func:`register_dataset`; :func:`load_dataset` resolves a name
(``"digits"``, ``"pets"``, ``"imagefolder:/path"``) and a split (``train``, ``val``, ``test``). Unless a
data set ships its own validation images, ``val`` is a seeded, stratified ``val_fraction`` of the
training pool and ``train`` is the rest, as in the official AdapterTune code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from atexport.errors import BadInputError
from atexport.utils.images import IMAGE_SUFFIXES

SPLITS = ("train", "val", "test")
DATA_DIR_ENV = "ATEXPORT_DATA_DIR"


def default_data_dir() -> Path:
    """``$ATEXPORT_DATA_DIR`` if set, else ``./data`` (where the official code keeps its data)."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


# --------------------------------------------------------------------------------------------------
# Data set classes


class ImageDataset:
    """Indexable ``(PIL RGB image, label)`` samples with class names.

    Subclasses implement :meth:`load`; ``targets`` holds every label up front so splits and
    subsets never decode images.
    """

    def __init__(self, name: str, class_names: Sequence[str], targets: Sequence[int], split: str = ""):
        self.name = name
        self.split = split
        self.class_names = list(class_names)
        self.targets = [int(t) for t in targets]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({n} images)")
        return self.load(i), self.targets[i]

    def load(self, i: int):
        """The ``i``-th image as 8-bit RGB."""
        raise NotImplementedError

    def path(self, i: int) -> str:
        """Where sample ``i`` comes from (a file path, or ``name[split][i]`` for in-memory arrays)."""
        return f"{self.name}[{self.split}][{i}]"

    def subset(self, indices: Sequence[int], split: str | None = None) -> "SubsetDataset":
        return SubsetDataset(self, indices, split or self.split)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"


class SubsetDataset(ImageDataset):
    """A selection of another data set's samples (a split, or ``--limit-train``)."""

    def __init__(self, base: ImageDataset, indices: Sequence[int], split: str):
        self.base = base
        self.indices = [int(i) for i in indices]
        super().__init__(base.name, base.class_names, [base.targets[i] for i in self.indices], split)

    def load(self, i: int):
        return self.base.load(self.indices[i])

    def path(self, i: int) -> str:
        return self.base.path(self.indices[i])


class FileImageDataset(ImageDataset):
    """Images in files; any Pillow mode is converted to RGB, a broken file is reported by path."""

    def __init__(self, name: str, files: Sequence, targets: Sequence[int], class_names: Sequence[str], split: str = ""):
        super().__init__(name, class_names, targets, split)
        self.files = [str(f) for f in files]

    def load(self, i: int):
        from atexport.utils.images import open_image

        return open_image(self.files[i])

    def path(self, i: int) -> str:
        return self.files[i]


class ArrayImageDataset(ImageDataset):
    """Images held in a uint8 array, ``(N, H, W)`` grey or ``(N, H, W, C)`` (CIFAR, SVHN, digits).

    Args:
        upscale: resize every image to this square size (bicubic) when loading, e.g. the 8x8 digits.
    """

    def __init__(self, name, images: np.ndarray, targets, class_names, split: str = "", upscale: int | None = None):
        super().__init__(name, class_names, targets, split)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"expected uint8 (N,H,W[,C]) images, got {images.dtype} {images.shape}")
        self.images = images
        self.upscale = upscale

    def load(self, i: int):
        from PIL import Image

        from atexport.utils.images import to_rgb

        img = to_rgb(Image.fromarray(self.images[i]))
        if self.upscale and img.size != (self.upscale, self.upscale):
            img = img.resize((self.upscale, self.upscale), Image.BICUBIC)
        return img


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set.

    Attributes:
        name: registry name (``--dataset NAME``).
        build: ``build(split, root, download, **kw)`` for split ``train`` (the whole training pool),
            ``val`` (its own validation images, or ``None`` to carve them from ``train``) and ``test``.
        description: one line for ``--help``.
        num_classes: class count, when fixed.
        folder: the subfolder of the data dir it lives in (for messages), if any.
        size: approximate download size, for the missing-data message.
        offline: needs no files at all (bundled with a library).
    """

    name: str
    build: Callable
    description: str
    num_classes: int | None = None
    folder: str | None = None
    size: str | None = None
    offline: bool = False


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, **info) -> Callable:
    """Decorator: register ``build(split, root, download, **kw)`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"data set {name!r} is already registered")
        _REGISTRY[name] = DatasetEntry(name=name, build=fn, **info)
        return fn

    return deco


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def dataset_entry(name: str) -> tuple[DatasetEntry, dict]:
    """Look up ``name`` (``"kind:ARG"`` passes ARG as ``path``); clear error for unknown names."""
    kind, sep, arg = str(name).partition(":")
    entry = _REGISTRY.get(kind)
    if entry is None:
        raise BadInputError(
            f"--dataset {name}: unknown data set. Available: "
            f"{', '.join(n for n in available_datasets() if n != 'imagefolder')}, "
            "or imagefolder:PATH (a folder with train/ and val/ or test/, one subfolder per class)."
        )
    kw = {}
    if sep:
        if not arg:
            raise BadInputError(f"--dataset {name}: give the path after the colon, e.g. {kind}:/data/birds.")
        kw["path"] = arg
    elif kind == "imagefolder":
        raise BadInputError("--dataset imagefolder needs a path: imagefolder:PATH.")
    return entry, kw


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into ``(rest, held_out)``: a seeded ``fraction`` of each class is held out."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        held.extend(idx[:k].tolist())
    held_set = set(held)
    rest = [i for i in range(len(targets)) if i not in held_set]
    return rest, sorted(held)


def seeded_subset(ds: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """A seeded random ``n`` of ``ds`` (for ``--limit-train``); ``ds`` itself when ``n`` covers it."""
    if n is None or n >= len(ds):
        return ds
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    return ds.subset(sorted(idx.tolist()))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}.")


def _check_fraction(val_fraction: float) -> float:
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise BadInputError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    return val_fraction


def load_splits(
    name: str,
    splits: Sequence[str] = SPLITS,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    **kw,
) -> dict[str, ImageDataset]:
    """Load several splits of one data set, reading the training pool once.

    Args:
        name: registry name, or ``imagefolder:PATH``.
        splits: any of ``train``, ``val``, ``test``.
        data_dir: root folder of downloaded data sets (default ``$ATEXPORT_DATA_DIR`` or ``./data``).
        download: let torchvision download a missing data set.
        seed: seed of the validation split.
        val_fraction: share of each class of the training pool held out for ``val`` (0: no ``val``).
        **kw: data-set specific options (e.g. ``size`` for digits).
    """
    for s in splits:
        _check_split(s)
    val_fraction = _check_fraction(val_fraction)
    entry, extra = dataset_entry(name)
    kw = {**kw, **extra}
    root = Path(os.path.expanduser(str(data_dir))) if data_dir is not None else default_data_dir()
    out: dict[str, ImageDataset] = {}
    if "test" in splits:
        out["test"] = entry.build("test", root, download, **kw)
    if "train" in splits or "val" in splits:
        native_val = entry.build("val", root, download, **kw)
        if native_val is not None:
            if "val" in splits:
                out["val"] = native_val
            if "train" in splits:
                out["train"] = entry.build("train", root, download, **kw)
        else:
            pool = entry.build("train", root, download, **kw)
            if val_fraction == 0.0:
                if "val" in splits:
                    raise BadInputError(
                        f"data set {name!r} has no validation split and val_fraction is 0; "
                        "set val_fraction > 0 (e.g. 0.1) to hold out part of the training set."
                    )
                out["train"] = pool
            else:
                train_idx, val_idx = stratified_split(pool.targets, val_fraction, seed)
                if "train" in splits:
                    out["train"] = pool.subset(train_idx, "train")
                if "val" in splits:
                    out["val"] = pool.subset(val_idx, "val")
    for s, ds in out.items():
        if len(ds) == 0:
            raise BadInputError(f"data set {name!r}: the {s} split is empty.")
    return {s: out[s] for s in splits}


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    **kw,
) -> ImageDataset:
    """Load one split of a data set as PIL images with labels.

    ``val`` is the seeded, stratified ``val_fraction`` of the training set (unless the data set has
    its own validation images) and ``train`` what remains; ``test`` is the held-out test split.

    Example:
        >>> ds = load_dataset("digits", "train")
        >>> img, label = ds[0]; ds.class_names[label]
    """
    return load_splits(name, (split,), data_dir, download, seed, val_fraction, **kw)[split]


# --------------------------------------------------------------------------------------------------
# Offline: scikit-learn's digits


@register_dataset(
    "digits",
    description="scikit-learn's 1,797 handwritten digits (8x8, 10 classes), offline; 20% fixed test split",
    num_classes=10,
    offline=True,
)
def _digits(split: str, root: Path, download: bool, size: int = 64, test_fraction: float = 0.2, **_):
    """8x8 grey digits scaled to 0-255 and upscaled (bicubic) to ``size`` px RGB.

    The data set has no official split: a fixed (seed 0, stratified) 20% is the test split, so every
    training seed is scored on the same images.
    """
    if split == "val":
        return None
    from atexport.errors import require

    datasets = require("sklearn.datasets", "the offline digits data set", "torch")
    d = datasets.load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    rest, test = stratified_split(d.target, test_fraction, seed=0)
    idx = test if split == "test" else rest
    names = [str(i) for i in range(10)]
    return ArrayImageDataset("digits", images[idx], d.target[idx], names, split, upscale=int(size))


# --------------------------------------------------------------------------------------------------
# A user's own folder of images


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path, class_names: list[str], name: str, split: str) -> FileImageDataset:
    index = {c: i for i, c in enumerate(class_names)}
    files, targets = [], []
    for d in _class_folders(folder):
        if d.name not in index:
            raise BadInputError(
                f"{d}: class folder {d.name!r} does not exist under train/; every class of "
                f"{folder.name}/ must also be a class of train/."
            )
        found = [f for f in sorted(d.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        if not found and split == "train":  # a class the model could never learn, silently
            raise BadInputError(
                f"{d}: class folder {d.name!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}); add images or "
                "remove the folder."
            )
        files += found
        targets += [index[d.name]] * len(found)
    if not files:
        raise BadInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders.")
    return FileImageDataset(name, files, targets, class_names, split)


@register_dataset(
    "imagefolder",
    description="your own images: imagefolder:PATH with train/ and val/ or test/, one subfolder per class",
)
def _imagefolder(split: str, root: Path, download: bool, path: str | None = None, **_):
    """``PATH/train/<class>/*`` plus ``PATH/test/`` or ``PATH/val/`` (the test split).

    With both ``val/`` and ``test/``, ``val/`` is the validation split; with one of them it is the
    test split and validation images are held out of ``train/``.
    """
    base = Path(os.path.expanduser(str(path)))
    if not base.is_dir():
        raise BadInputError(f"--dataset imagefolder:{path}: no such folder.")
    train_dir, val_dir, test_dir = base / "train", base / "val", base / "test"
    if not train_dir.is_dir() or not (val_dir.is_dir() or test_dir.is_dir()):
        found = ", ".join(p.name + "/" for p in _class_folders(base)) or "nothing"
        raise BadInputError(
            f"--dataset imagefolder:{path}: expected train/ and val/ or test/ subfolders, each with one "
            f"folder per class (found {found})."
        )
    class_names = [d.name for d in _class_folders(train_dir)]
    if not class_names:
        raise BadInputError(f"{train_dir}: no class subfolders.")
    if len(class_names) < 2:  # trains to "100%, loss 0" and means nothing
        raise BadInputError(
            f"{train_dir}: only one class folder ({class_names[0]!r}); a classifier needs at least two classes, "
            "one subfolder each."
        )
    name = f"imagefolder:{base}"
    if split == "train":
        return _scan(train_dir, class_names, name, "train")
    if split == "val":
        return _scan(val_dir, class_names, name, "val") if (val_dir.is_dir() and test_dir.is_dir()) else None
    return _scan(test_dir if test_dir.is_dir() else val_dir, class_names, name, "test")


# --------------------------------------------------------------------------------------------------
# torchvision data sets (downloaded with --download)


def _torchvision(name: str, folder: str, root: Path, download: bool, size: str | None, make: Callable):
    """Build a torchvision data set, turning 'not found' and download failures into clear messages."""
    from atexport.errors import require

    tv = require("torchvision.datasets", f"the {name} data set", "torch")
    where = root / folder
    try:
        if download:
            root.mkdir(parents=True, exist_ok=True)
        return make(tv, root)
    except RuntimeError as e:
        if "not found" not in str(e).lower() and "download=true" not in str(e).lower():
            raise
        how = f"about {size} " if size else ""
        raise BadInputError(
            f"data set {name!r} not found: looked in {where.resolve()}. Download it with --download "
            f"({how}into {root.resolve()}), or point --data-dir at the folder that holds {folder}/."
        ) from None
    except OSError as e:  # network failure while downloading, unreadable files
        verb = "download" if download else "read"
        raise BadInputError(f"data set {name!r}: cannot {verb} it into {where} ({e}).") from None


def _files_dataset(name, tvds, split, class_names=None) -> FileImageDataset:
    # torchvision keeps the file list and labels in private attributes (pets: _images).
    files = tvds._images if hasattr(tvds, "_images") else tvds._image_files
    return FileImageDataset(name, files, tvds._labels, class_names or list(tvds.classes), split)


def _concat_files(name, parts, split, class_names) -> FileImageDataset:
    files = [f for p in parts for f in p.files]
    targets = [t for p in parts for t in p.targets]
    return FileImageDataset(name, files, targets, class_names, split)


@register_dataset("pets", description="Oxford-IIIT Pet, 37 breeds (trainval / test)", num_classes=37,
                  folder="oxford-iiit-pet", size="800 MB")
def _pets(split, root, download, **_):
    if split == "val":
        return None
    tv_split = "trainval" if split == "train" else "test"
    ds = _torchvision("pets", "oxford-iiit-pet", root, download, "800 MB",
                      lambda tv, r: tv.OxfordIIITPet(r, split=tv_split, target_types="category", download=download))
    return _files_dataset("pets", ds, split)


def _cifar(name, cls_name, folder):
    def build(split, root, download, **_):
        if split == "val":
            return None
        ds = _torchvision(name, folder, root, download, "170 MB",
                          lambda tv, r: getattr(tv, cls_name)(r, train=(split == "train"), download=download))
        return ArrayImageDataset(name, np.asarray(ds.data), ds.targets, ds.classes, split)

    return build


register_dataset("cifar10", description="CIFAR-10, 10 classes, 32x32 (train / test)", num_classes=10,
                 folder="cifar-10-batches-py", size="170 MB")(_cifar("cifar10", "CIFAR10", "cifar-10-batches-py"))
register_dataset("cifar100", description="CIFAR-100, 100 classes, 32x32 (train / test)", num_classes=100,
                 folder="cifar-100-python", size="170 MB")(_cifar("cifar100", "CIFAR100", "cifar-100-python"))


@register_dataset("svhn", description="SVHN house numbers, 10 classes, 32x32 (train / test)", num_classes=10,
                  folder="svhn", size="250 MB")
def _svhn(split, root, download, **_):
    if split == "val":
        return None
    ds = _torchvision("svhn", "svhn", root, download, "250 MB",
                      lambda tv, r: tv.SVHN(r / "svhn", split=split, download=download))
    images = np.ascontiguousarray(np.asarray(ds.data).transpose(0, 2, 3, 1))  # (N,3,H,W) -> (N,H,W,3)
    return ArrayImageDataset("svhn", images, ds.labels, [str(i) for i in range(10)], split)


@register_dataset("food101", description="Food-101, 101 dishes (train / test)", num_classes=101,
                  folder="food-101", size="5 GB")
def _food101(split, root, download, **_):
    if split == "val":
        return None
    ds = _torchvision("food101", "food-101", root, download, "5 GB",
                      lambda tv, r: tv.Food101(r, split=split, download=download))
    return _files_dataset("food101", ds, split)


@register_dataset("flowers102", description="Oxford Flowers-102 (train+val pooled / test)", num_classes=102,
                  folder="flowers-102", size="350 MB")
def _flowers102(split, root, download, **_):
    """Official ``train`` and ``val`` are pooled into the training set, as in the official code."""
    if split == "val":
        return None

    def make(tv_split):
        return _torchvision("flowers102", "flowers-102", root, download, "350 MB",
                            lambda tv, r: tv.Flowers102(r, split=tv_split, download=download))

    if split == "test":
        ds = make("test")
        return _files_dataset("flowers102", ds, split, list(ds.classes))
    parts = [make(s) for s in ("train", "val")]
    classes = list(parts[0].classes)
    return _concat_files("flowers102", [_files_dataset("flowers102", p, split, classes) for p in parts], split, classes)


@register_dataset("fgvc_aircraft", description="FGVC-Aircraft, 100 variants (trainval / test)", num_classes=100,
                  folder="fgvc-aircraft-2013b", size="2.7 GB")
def _aircraft(split, root, download, **_):
    if split == "val":
        return None
    tv_split = "trainval" if split == "train" else "test"
    ds = _torchvision("fgvc_aircraft", "fgvc-aircraft-2013b", root, download, "2.7 GB",
                      lambda tv, r: tv.FGVCAircraft(r, split=tv_split, annotation_level="variant", download=download))
    return _files_dataset("fgvc_aircraft", ds, split)
