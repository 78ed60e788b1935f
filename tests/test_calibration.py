"""Calibration sets (definitions, folders, warnings) and the calibration cache (reuse, never for another model)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

from atexport.errors import BadInputError
from atexport.export.precision.calibration import (
    CalibrationWarning,
    available_sets,
    load_calibration_set,
    model_hash,
)


@pytest.fixture(scope="session")
def calib_fp32(tmp_path_factory, tiny_ckpt):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("calib") / "tiny.onnx", ExportSettings(verify=False)).path


def test_shipped_sets_load():
    assert {"digits", "photos", "pets", "imagenet-style"} <= set(available_sets())
    cs = load_calibration_set("digits", count=16, seed=3)
    assert (cs.source, cs.split, cs.count, cs.seed) == ("digits", "train", 16, 3)
    imgs = cs.images()
    assert len(imgs) == 16 and all(im.mode == "RGB" for im in imgs)
    # deterministic selection, and the seed matters
    a = [np.asarray(im).sum() for im in imgs]
    assert a == [np.asarray(im).sum() for im in load_calibration_set("digits", count=16, seed=3).images()]
    assert a != [np.asarray(im).sum() for im in load_calibration_set("digits", count=16, seed=4).images()]


def test_images_go_through_the_models_preprocessing():
    pre = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
           "crop_pct": 0.9, "crop_mode": "center"}
    x = load_calibration_set("digits", count=8, min_images=4).batch(pre)
    assert x.shape == (8, 3, 32, 32) and x.dtype == np.float32
    assert -1.01 <= x.min() and x.max() <= 1.01  # (x - 0.5) / 0.5


def test_folder_and_warning_below_min_images(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / "train" / cls / f"{i}.png")
    cs = load_calibration_set(tmp_path / "train")
    # a source too small for count + holdout keeps a quarter of its images out of calibration
    assert cs.source == "folder" and len(cs.images()) == 5 and len(cs.images("holdout")) == 1
    pre = {"input_size": [3, 32, 32], "mean": [0, 0, 0], "std": [1, 1, 1]}
    with pytest.warns(CalibrationWarning, match="only 5 images"):
        cs.batch(pre)
    # a YAML definition whose relative path is beside the file
    (tmp_path / "mine.yaml").write_text("name: mine\nsource: folder\npath: train\ncount: 4\nseed: 1\n")
    cs = load_calibration_set(tmp_path / "mine.yaml", min_images=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(cs.batch(pre)) == 4


def test_set_name_shadowed_by_a_folder_is_refused(tmp_path, monkeypatch):
    """--calib digits in a folder that holds a digits/ folder (e.g. the quickstart's output): ambiguous."""
    (tmp_path / "digits").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError, match="both a calibration set"):
        load_calibration_set("digits")
    assert load_calibration_set("./digits").source == "folder"


def test_digits_calibration_never_uses_the_test_split():
    """The digits set follows atexport.data's split: its train images are the training pool's."""
    from atexport.data import dataset_entry

    entry, _ = dataset_entry("digits")
    test = {np.asarray(entry.build("test", None, False)[i][0]).tobytes() for i in range(40)}
    train = [np.asarray(im).tobytes() for im in load_calibration_set("digits", count=64).images()]
    assert not test & set(train)


def test_bad_sets_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="no calibration config named 'nope'"):
        load_calibration_set("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no image files"):
        load_calibration_set(tmp_path / "empty").images()
    with pytest.raises(BadInputError, match="source"):
        load_calibration_set({"name": "x", "source": "web"})


def test_model_hash_ignores_metadata_not_weights(calib_fp32):
    m = onnx.load(str(calib_fp32))
    h = model_hash(m)
    m.metadata_props.add(key="note", value="edited")
    assert model_hash(m) == h
    m.graph.initializer[-1].raw_data = bytes(len(m.graph.initializer[-1].raw_data))
    assert model_hash(m) != h


def test_cache_reused_then_not_for_a_changed_model(calib_fp32, tmp_path):
    from atexport.export.precision import Int8Options, quantize_int8

    cache = tmp_path / "tiny.calib.json"
    first = quantize_int8(calib_fp32, tmp_path / "a.int8.onnx", {"name": "digits", "source": "digits", "count": 32, "min_images": 16}, verify=False,
                          options=Int8Options(cache=cache, keep_float="none"))
    assert first.calibration["cache_status"].startswith("computed") and cache.is_file()
    doc = json.loads(cache.read_text())
    assert doc["model_sha256"] == model_hash(onnx.load(str(calib_fp32)))

    second = quantize_int8(calib_fp32, tmp_path / "b.int8.onnx", {"name": "digits", "source": "digits", "count": 32, "min_images": 16}, verify=False,
                           options=Int8Options(cache=cache, keep_float="none"))
    assert second.calibration["cache_status"] == "reused"
    assert onnx.load(str(tmp_path / "a.int8.onnx")).graph == onnx.load(str(tmp_path / "b.int8.onnx")).graph

    # other images: recomputed
    other = quantize_int8(calib_fp32, tmp_path / "c.int8.onnx", {"name": "d", "source": "digits", "count": 32, "seed": 7, "min_images": 16}, verify=False,
                          options=Int8Options(cache=cache, keep_float="none"))
    assert "other calibration images" in other.calibration["cache_status"]

    # a changed model (one weight changed): never reuses another model's ranges
    m = onnx.load(str(calib_fp32))
    w = m.graph.initializer[-2]
    arr = onnx.numpy_helper.to_array(w).copy() * 1.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(m, str(changed))
    res = quantize_int8(changed, tmp_path / "d.int8.onnx", {"name": "d", "source": "digits", "count": 32, "seed": 7, "min_images": 16}, verify=False,
                        options=Int8Options(cache=cache, keep_float="none"))
    assert "another model" in res.calibration["cache_status"]
    assert json.loads(cache.read_text())["model_sha256"] == model_hash(m)


def test_sensitivity_is_cached_with_the_calibration(calib_fp32, tmp_path):
    """keep_float=auto measures per-layer sensitivity once; the next run on the same model, images and
    settings reuses it (and chooses the same layers); other sensitivity settings measure again."""
    from atexport.export.precision import Int8Options, quantize_int8

    cache = tmp_path / "tiny.calib.json"
    calib = {"name": "digits", "source": "digits", "count": 32, "min_images": 16}
    first = quantize_int8(calib_fp32, tmp_path / "a.int8.onnx", calib, verify=False,
                          options=Int8Options(cache=cache, keep_float="auto"))
    kf1 = first.metadata.extra["precision"]["keep_float"]
    assert kf1["sensitivity"]["cache_status"].startswith("computed") and "saved" in kf1["sensitivity"]["cache_status"]
    assert json.loads(cache.read_text())["sensitivity"]["result"]["scores"]
    second = quantize_int8(calib_fp32, tmp_path / "b.int8.onnx", calib, verify=False,
                           options=Int8Options(cache=cache, keep_float="auto"))
    kf2 = second.metadata.extra["precision"]["keep_float"]
    assert kf2["sensitivity"]["cache_status"] == "reused" and kf2["layers"] == kf1["layers"]
    from atexport.export.precision import Int8Options, load_precision_config

    cfg = load_precision_config()
    cfg["int8"]["keep_float"] = {**cfg["int8"]["keep_float"], "images": 16}
    third = quantize_int8(calib_fp32, tmp_path / "c.int8.onnx", calib, verify=False, config=cfg,
                          options=Int8Options(cache=cache, keep_float="auto"))
    assert "other settings" in third.metadata.extra["precision"]["keep_float"]["sensitivity"]["cache_status"]


def test_histogram_calibration_is_collected_in_steps(calib_fp32, tmp_path):
    """percentile: images go to ONNX Runtime's calibrator a few at a time (its memory grows with every
    intermediate output of a step) and the merged histograms still give sane, recorded ranges."""
    from atexport.export.precision import check_int8_graph, Int8Options, quantize_int8

    calib = {"name": "digits", "source": "digits", "count": 48, "min_images": 16}
    res = quantize_int8(calib_fp32, tmp_path / "p.int8.onnx", calib, verify=False,
                        options=Int8Options(method="percentile", cache=tmp_path / "p.calib.json", keep_float="none"))
    settings = res.metadata.extra["precision"]["calibration_settings"]
    assert settings["method"] == "percentile" and settings["collect_images"] == 32 and settings["num_bins"] == 2048
    m = onnx.load(str(res.path))
    assert check_int8_graph(m) == []
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    scales = [inits[n.input[1]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(scales) > 10 and all(np.isfinite(x).all() and (x > 0).all() for x in scales)
