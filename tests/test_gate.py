"""The parity gate: one rule for every precision check, the same verdict for the same model quality on any CPU.

Unit cases pin the rule (tie-aware top-1 flips, cosine outliers, binomial significance); populations with
the noise of a healthy model at two noise levels (one CPU's INT8 rounding and another's) must pass and a
broken one must fail; on a real INT8 model the held-out in-domain images are judged, and a Q/DQ scale
moved by 10x is refused with the layer where it breaks named.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from atexport.errors import ParityError
from atexport.parity.compare import Tolerance, compare, load_tolerances, top1_flips
from atexport.parity.stats import binomial_sf, significantly_above, upper_bound

INT8 = load_tolerances()["int8"]

# ---------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("k,n,p", [(0, 5, 0.3), (1, 5, 0.3), (3, 13, 0.01), (2, 40, 0.05), (7, 7, 0.5)])
def test_binomial_sf_equals_the_direct_sum(k, n, p):
    direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
    assert binomial_sf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("n", [13, 128, 1000])
def test_upper_bound_of_zero_is_the_closed_form(n):
    assert upper_bound(0, n, 0.95) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-6)


@pytest.mark.parametrize("k,n,allowed,significant", [
    (1, 13, 0.01, False),   # one flip in a dozen photos is no evidence against 1%
    (1, 13, 0.20, False),
    (3, 13, 0.20, False),   # the 76.9% agreement on 13 photos
    (2, 13, 0.01, True),    # two flips beyond the error in 13 are
    (3, 128, 0.01, False),
    (4, 128, 0.01, True),
    (1, 1000, 0.0, True),   # an allowed share of 0 (FP32) allows none
    (0, 1000, 0.0, False),
])
def test_significance_table(k, n, allowed, significant):
    assert significantly_above(k, n, allowed, 0.95) is significant


# ---------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("ref,cand,flips,ties", [
    ([5.0, 4.99, 0.0], [4.99, 5.0, 0.0], 0, 1),      # margin 0.01 <= error 0.01, cosine ~1: a near-tie
    ([5.0, 4.85, 0.0], [4.92, 4.93, 0.0], 1, 0),     # margin 0.15 > error 0.08: a flip
    ([5.0, 4.9, 0.0], [0.0, 6.0, 5.0], 1, 0),        # a large error on a broken sample never excuses its flip
    ([5.0, 1.0, 0.0], [5.1, 1.0, 0.0], 0, 0),        # same decision
])
def test_flip_or_near_tie(ref, cand, flips, ties):
    r = compare(np.array([ref]), np.array([cand]), INT8, judged=True)
    assert (r.flips, r.near_ties) == (flips, ties)


def test_smoke_rows_judge_magnitude_only():
    ref = np.array([[5.0, 4.9, 0.0]] * 10)
    cand = np.array([[0.0, 6.0, 5.0]] * 10)
    assert not compare(ref, cand, INT8, judged=True).passed
    smoke = compare(ref, cand + 0.0, Tolerance(max_abs=10, max_rel=10, min_cosine=0.99), judged=False)
    assert smoke.passed and not smoke.judged
    assert not compare(ref, cand * np.nan, INT8, judged=False).passed  # non-finite fails any row


def _population(n, classes=10, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, spread, (n, classes))


@pytest.mark.parametrize("noise", [0.02, 0.04])
def test_healthy_noise_passes_at_either_level(noise):
    """Two CPUs' INT8 rounding differ; a healthy model's verdict must not (the issue-18 AMD failure)."""
    ref = _population(256)
    cand = ref + np.random.default_rng(1).normal(0, noise, ref.shape)
    r = compare(ref, cand, INT8)
    assert r.passed, r.failures
    assert r.near_ties >= 0 and r.flips <= 2


def test_near_tied_photos_give_no_verdict_on_flips():
    """13 photos, three of them nearly tied between two classes: three flips inside a small error are ties."""
    ref = _population(13, classes=5, spread=1.0)
    order = np.argsort(ref, axis=1)
    rows = np.arange(3)
    ref[rows, order[rows, -2]] = ref[rows, order[rows, -1]] - 0.005  # top-2 margin 0.005
    cand = ref.copy()
    cand[rows, order[rows, -1]] -= 0.006  # an error of 0.006 moves the decision
    r = compare(ref, cand, INT8)
    assert r.top1_agreement == pytest.approx(10 / 13) and r.flips == 0 and r.near_ties == 3 and r.passed
    worse = cand.copy()
    worse[rows] += np.random.default_rng(2).normal(0, 0.5, worse[rows].shape)  # large errors excuse nothing
    assert compare(ref, worse, INT8).near_ties == 0


def test_broken_candidate_fails():
    ref = _population(256)
    cand = ref + np.random.default_rng(1).normal(0, 1.5, ref.shape)
    r = compare(ref, cand, INT8)
    assert not r.passed and r.flips > 10 and any("top-1 flips" in f for f in r.failures)


# ---------------------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory, tiny_ckpt):
    from atexport.export.onnx import export_onnx
    from atexport.export.precision import Int8Options, quantize_int8
    from atexport.export.settings import ExportSettings

    d = tmp_path_factory.mktemp("gate")
    fp32 = export_onnx(tiny_ckpt, d / "tiny.onnx", ExportSettings(verify=False)).path
    return fp32, quantize_int8(fp32, d / "tiny.int8.onnx", "digits", options=Int8Options(count=64, keep_float="none"))


def test_int8_is_judged_on_held_out_in_domain_images(int8_pair):
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.export.precision.calibration import load_calibration_set

    _fp32, res = int8_pair
    judged = [r for r in res.parity if r.judged]
    assert [r.name for r in judged] == ["int8 held-out digits (batch 4)"] and judged[0].samples == 128
    assert all(not r.judged for r in res.parity if "photos" in r.name or "random" in r.name)
    meta = read_onnx_metadata(onnx.load(str(res.path)))
    assert meta.extra["precision"]["calibration"]["held_out"] == 128
    calib, held = load_calibration_set("digits", count=64).split_indices(1438)
    assert len(calib) == 64 and len(held) == 128 and not set(calib) & set(held)


def _break_dq_scale(src, fp32, dst, layer: str, factor: float = 10.0):
    """Multiply the activation DQ scale feeding ``layer`` (a PyTorch module name, read off the FP32 model
    the INT8 one keeps the node names of) by ``factor``."""
    from onnx import numpy_helper

    from atexport.export.precision.inspect import layer_names

    m = onnx.load(str(src))
    node = next(n for n, name in layer_names(onnx.load(str(fp32))).items() if name == layer)
    prod = {o: n for n in m.graph.node for o in n.output}
    target = next(n for n in m.graph.node if n.name == node)
    dq = prod[target.input[0]]
    assert dq.op_type == "DequantizeLinear" and prod[dq.input[0]].op_type == "QuantizeLinear"
    inits = {i.name: i for i in m.graph.initializer}
    scale = numpy_helper.to_array(inits[dq.input[1]]) * np.float32(factor)
    m.graph.initializer.append(numpy_helper.from_array(scale, dq.input[1] + "_broken"))
    dq.input[1] = dq.input[1] + "_broken"
    onnx.save(m, str(dst))
    return dst


def test_recheck_passes_the_model_and_refuses_a_broken_scale_naming_the_layer(int8_pair, tmp_path):
    from atexport.export.precision.check import check_precision

    fp32, res = int8_pair
    assert all(r.passed for r in check_precision(res.path, fp32))
    broken = _break_dq_scale(res.path, fp32, tmp_path / "broken.int8.onnx", "blocks.1.block.mlp.fc1")
    with pytest.raises(ParityError) as e:
        check_precision(broken, fp32)
    msg = str(e.value)
    assert "held-out digits" in msg and "at blocks.1.block.mlp.fc1" in msg and "per-block tolerance" in msg


def test_openvino_judges_the_int8_model_on_its_held_out_images(int8_pair, tmp_path):
    pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
    from atexport.export.openvino import to_openvino

    _fp32, res = int8_pair
    ov = to_openvino(res.path, tmp_path / "tiny.int8.xml")
    assert [r.name for r in ov.parity if r.judged] == ["openvino int8 held-out digits (batch 4)"]
