"""INT8 on the activations of pretrained ViTs: the outlier model generator, SmoothQuant folding, the default.

Random-init and small trained ViTs have no activation outliers, so INT8 on them proves little about real
pretrained ViTs. The generator puts such outliers into a tiny ViT without changing its FP32 function; on
it, naive per-tensor INT8 must lose visibly (the generator has teeth) and the default INT8 (smoothing
folded into LayerNorm and Linear) must keep the model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from atexport.errors import BadInputError, ParityError
from _helpers import make_outlier_checkpoint, tiny_spec


@pytest.fixture(scope="module")
def outlier_onnx(tmp_path_factory):
    from atexport.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("outliers")
    return export_onnx(make_outlier_checkpoint(d), d / "outlier.onnx").path  # parity-checked against PyTorch


@pytest.fixture(scope="module")
def test_split(outlier_onnx):
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.export.precision.calibration import load_calibration_set

    meta = read_onnx_metadata(onnx.load(str(outlier_onnx)))
    return load_calibration_set({"name": "t", "source": "digits", "split": "test", "count": 359}).batch(meta.preprocess)


def _logits(path, x):
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(str(path)) as r:
        return r.infer(x)


def _rel_error(ref, y):
    d = y - ref
    return float(np.linalg.norm(d - d.mean(1, keepdims=True)) / np.linalg.norm(ref - ref.mean(1, keepdims=True)))


def test_generator_keeps_the_fp32_function_and_makes_outliers():
    import torch

    from atexport.models import create_backbone, inject_activation_outliers

    model = create_backbone(tiny_spec(10, 0)).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = {}
    model.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("ln", o.detach().abs()))
    with torch.no_grad():
        before = model(x)
        even = seen["ln"].amax(dim=(0, 1))
        chosen = inject_activation_outliers(model, factor=50.0, channels=2)
        after = model(x)
    amax = seen["ln"].amax(dim=(0, 1))
    assert (before - after).abs().max().item() < 1e-5
    assert float(even.max() / even.median()) < 8 < float(amax.max() / amax.median())
    assert sorted(chosen) == [0, 1, 2, 3] and len(chosen[1]["norm1"]) == 2


def test_smoothing_is_exact_in_fp32_and_names_what_it_did(outlier_onnx, test_split):
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.export.precision.calibration import load_calibration_set
    from atexport.export.precision.smooth import smooth_model

    src = onnx.load(str(outlier_onnx))
    calib = load_calibration_set("digits", count=64).batch(read_onnx_metadata(src).preprocess)
    smoothed, report = smooth_model(src, calib, alpha=0.5, min_ratio=8.0)
    assert [s["layer"] for s in report["smoothed"]][:2] == ["blocks.0.block.norm1", "blocks.0.block.norm2"]
    assert len(report["smoothed"]) == 8 and all(s["ratio"] > 20 for s in report["smoothed"])
    assert report["skipped"] and "cannot absorb" in report["skipped"][0]["reason"]
    ref = _logits(outlier_onnx, test_split)
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(smoothed.SerializeToString()) as r:
        assert np.abs(r.infer(test_split) - ref).max() < 1e-4


def test_naive_int8_loses_and_the_default_keeps_the_model(outlier_onnx, test_split, tmp_path):
    from atexport.export.precision import Int8Options, quantize_int8

    ref = _logits(outlier_onnx, test_split)
    with pytest.raises(ParityError) as e:  # per-tensor INT8 of the outlier channels: refused by the gate
        quantize_int8(outlier_onnx, tmp_path / "naive.int8.onnx", "digits",
                      options=Int8Options(smooth="off", keep_float="none", cache=False))
    naive = _logits(e.value.result.failed_path, test_split)
    default = quantize_int8(outlier_onnx, tmp_path / "default.int8.onnx", "digits", options=Int8Options(cache=False))
    good = _logits(default.path, test_split)
    assert _rel_error(ref, naive) > 5 * _rel_error(ref, good)
    assert (good.argmax(1) == ref.argmax(1)).mean() > (naive.argmax(1) == ref.argmax(1)).mean() + 0.2
    summary = default.summary()
    assert "smoothed:   8 LayerNorms" in summary and "blocks.0.block.norm1" in summary
    meta = onnx.load(str(default.path)).metadata_props
    assert any('"smooth": {"alpha": 0.5' in p.value for p in meta if p.key == "atexport")


def test_no_outliers_no_smoothing(tiny_ckpt, tmp_path):
    """A model without outlier channels is quantized as before (nothing smoothed, the same calibration)."""
    from atexport.export.onnx import export_onnx
    from atexport.export.precision import Int8Options, quantize_int8
    from atexport.export.settings import ExportSettings

    fp32 = export_onnx(tiny_ckpt, tmp_path / "tiny.onnx", ExportSettings(verify=False)).path
    res = quantize_int8(fp32, tmp_path / "tiny.int8.onnx", "digits", options=Int8Options(count=64, keep_float="none"))
    assert res.graph["smoothed"]["smoothed"] == [] and "none had outlier channels" in res.summary()


def test_swappable_layers_are_never_rescaled(outlier_onnx):
    from atexport.export.precision.inspect import layer_names
    from atexport.export.precision.smooth import candidates

    src = onnx.load(str(outlier_onnx))
    qkv = next(n for n, name in layer_names(src).items() if name == "blocks.0.block.attn.qkv")
    weight = next(n.input[1] for n in src.graph.node if n.name == qkv)
    ok, skipped = candidates(src, swappable=[weight])
    assert "blocks.0.block.norm1" not in [c["layer"] for c in ok]
    assert any(s["layer"] == "blocks.0.block.norm1" and "swappable" in s["reason"] for s in skipped)


@pytest.mark.parametrize("kwargs,match", [
    ({"smooth": "abc"}, "--int8-smooth abc"),
    ({"smooth": 1.5}, "between 0 and 1"),
    ({"smooth": 0.5, "op_policy": "all"}, "Linear-only policy"),
])
def test_bad_smooth_values_are_refused(outlier_onnx, tmp_path, kwargs, match):
    from atexport.export.precision import Int8Options, quantize_int8

    with pytest.raises(BadInputError, match=match):
        quantize_int8(outlier_onnx, tmp_path / "x.int8.onnx", "digits", options=Int8Options(**kwargs))
    assert not (tmp_path / "x.int8.onnx").exists()


def test_smooth_with_fp16_is_refused(outlier_onnx, tmp_path):
    from atexport.export.precision import convert_precision, Int8Options

    with pytest.raises(BadInputError, match="--int8-smooth applies to --precision int8"):
        convert_precision(outlier_onnx, "fp16", tmp_path / "x.fp16.onnx", int8=Int8Options(smooth=0.5))
