"""Data sets and transforms: the registry, splits, a user's image folder, missing-data messages."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atexport.data import (
    available_datasets,
    eval_transform,
    load_dataset,
    load_splits,
    seeded_subset,
    stratified_split,
    train_transform,
)
from atexport.errors import BadInputError

PP32 = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
        "crop_pct": 0.9, "crop_mode": "center"}


# -- registry ---------------------------------------------------------------------------------------

def test_registry_holds_the_paper_suite_and_the_offline_set():
    names = set(available_datasets())
    assert {"digits", "pets", "cifar10", "cifar100", "svhn", "food101", "flowers102",
            "fgvc_aircraft", "imagefolder"} <= names


@pytest.mark.parametrize("name,match", [
    ("nope", "unknown data set.*digits.*imagefolder:PATH"),
    ("imagefolder", "needs a path"),
    ("imagefolder:", "give the path"),
])
def test_bad_names_are_refused(name, match):
    with pytest.raises(BadInputError, match=match):
        load_dataset(name, "train")


def test_bad_split_and_fraction():
    with pytest.raises(BadInputError, match="unknown split"):
        load_dataset("digits", "dev")
    with pytest.raises(BadInputError, match="val_fraction"):
        load_dataset("digits", "train", val_fraction=1.5)
    with pytest.raises(BadInputError, match="no validation split"):
        load_dataset("digits", "val", val_fraction=0.0)


@pytest.mark.parametrize("name,folder", [
    ("pets", "oxford-iiit-pet"), ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("svhn", "svhn"), ("food101", "food-101"), ("flowers102", "flowers-102"),
    ("fgvc_aircraft", "fgvc-aircraft-2013b"),
])
def test_missing_torchvision_data_set_says_where_it_looked_and_how_to_get_it(tmp_path, name, folder):
    with pytest.raises(BadInputError) as e:
        load_dataset(name, "test", data_dir=tmp_path)  # download=False: nothing is fetched
    msg = str(e.value)
    assert str(tmp_path / folder) in msg and "--download" in msg and "--data-dir" in msg
    assert not any(tmp_path.iterdir())


# -- digits ------------------------------------------------------------------------------------------

def test_digits_splits_are_disjoint_stratified_and_seeded():
    s = load_splits("digits", seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (1295, 143, 359)
    assert len(s["train"]) + len(s["val"]) + len(s["test"]) == 1797
    assert s["train"].class_names == [str(i) for i in range(10)]
    assert set(s["train"].indices).isdisjoint(s["val"].indices)
    assert all(n >= 13 for n in np.bincount(s["val"].targets, minlength=10))  # ~10% of each class
    img, label = s["val"][0]
    assert img.mode == "RGB" and img.size == (64, 64) and 0 <= label < 10
    again = load_splits("digits", ("val",), seed=0)["val"]
    other = load_splits("digits", ("val",), seed=1)["val"]
    assert again.indices == s["val"].indices and other.indices != s["val"].indices
    # The test split does not depend on the seed.
    t1 = load_dataset("digits", "test", seed=1)
    assert [np.asarray(t1[i][0]).sum() for i in range(5)] == [np.asarray(s["test"][i][0]).sum() for i in range(5)]


def test_digits_pixels_are_the_real_data():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", "train", size=8)
    img, label = ds[0]
    raw = load_digits()
    match = [i for i in range(len(raw.images))
             if raw.target[i] == label and np.allclose(raw.images[i] * 255 / 16, np.asarray(img)[..., 0], atol=0.51)]
    assert match


def test_stratified_split_and_subsets():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    rest, held = stratified_split(targets, 0.1, seed=3)
    assert sorted(rest + held) == list(range(100))
    assert [sum(targets[i] == c for i in held) for c in range(3)] == [5, 3, 2]
    ds = load_dataset("digits", "test")
    sub = seeded_subset(ds, 20, seed=0)
    assert len(sub) == 20 and sub.indices == seeded_subset(ds, 20, seed=0).indices
    assert seeded_subset(ds, 10_000, seed=0) is ds


# -- a user's image folder ---------------------------------------------------------------------------

def _write_folder(root: Path, with_broken: bool = True, splits=("train", "test")):
    rng = np.random.default_rng(0)
    rgb = lambda: Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))  # noqa: E731
    for split in splits:
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            rgb().save(d / "rgb.png")
            rgb().convert("L").save(d / "grey.png")
            rgb().convert("RGBA").save(d / "rgba.png")
            rgb().convert("P").save(d / "palette.png")
            Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(d / "deep16.png")
            (d / "notes.txt").write_text("not an image")
    if with_broken:
        (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_imagefolder_converts_every_mode_and_names_a_broken_file(tmp_path):
    root = _write_folder(tmp_path / "pics")
    s = load_splits(f"imagefolder:{root}", val_fraction=0.2, seed=0)
    assert s["train"].class_names == ["cat", "dog"]
    assert len(s["test"]) == 10 and len(s["train"]) + len(s["val"]) == 11
    modes = {}
    for i in range(len(s["test"])):
        img, _ = s["test"][i]
        modes[Path(s["test"].path(i)).stem] = (img.mode, img.size)
    assert set(modes) == {"rgb", "grey", "rgba", "palette", "deep16"}
    assert all(m == "RGB" for m, _ in modes.values())
    pool = load_dataset(f"imagefolder:{root}", "train", val_fraction=0.0)
    broken = [i for i in range(len(pool)) if pool.path(i).endswith("broken.jpg")]
    assert broken
    with pytest.raises(BadInputError, match="broken.jpg"):
        pool[broken[0]]


def test_imagefolder_with_val_and_test_uses_both(tmp_path):
    root = _write_folder(tmp_path / "pics", with_broken=False, splits=("train", "val", "test"))
    s = load_splits(f"imagefolder:{root}")
    assert len(s["train"]) == len(s["val"]) == len(s["test"]) == 10
    assert "/val/" in s["val"].path(0) and "/test/" in s["test"].path(0)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(BadInputError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}", "train")
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(BadInputError, match="expected train/ and val/ or test/"):
        load_dataset(f"imagefolder:{tmp_path / 'flat'}", "train")
    root = _write_folder(tmp_path / "pics", with_broken=False)
    (root / "test" / "bird").mkdir()
    with pytest.raises(BadInputError, match="'bird' does not exist under train/"):
        load_dataset(f"imagefolder:{root}", "test")


# -- transforms ---------------------------------------------------------------------------------------

def test_eval_transform_matches_the_torch_free_preprocessing():
    from atexport.runtime.preprocess import Preprocessor

    ds = load_dataset("digits", "test")
    imgs = [ds[i][0] for i in range(4)]
    t = eval_transform(PP32)
    ours = np.stack([t(im).numpy() for im in imgs])
    ref = Preprocessor(PP32)(imgs)
    assert ours.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_train_transform_is_random_resized_crop_and_flip():
    import torch

    t = train_transform(PP32, scale=(0.5, 1.0), hflip=0.0)
    names = [type(x).__name__ for x in t.transforms]
    assert names[0].startswith("RandomResizedCrop") and not any("Flip" in n for n in names)
    assert not any("ColorJitter" in n for n in names)
    assert any("Flip" in type(x).__name__ for x in train_transform(PP32, hflip=0.5).transforms)
    img = load_dataset("digits", "train")[0][0]
    torch.manual_seed(0)
    x = t(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    with pytest.raises(BadInputError, match="lacks"):
        eval_transform({"input_size": [3, 32, 32]})
