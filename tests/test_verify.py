"""``atexport verify``: passes honest artifacts, fails a corrupted one naming the backend, and ``--per-block``
names the perturbed block. A tiny 10-class ViT (the offline digits data set), exported once per session."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import make_checkpoint

from atexport.errors import BadInputError, IncompatibleCheckpointError, ParityError

LIMIT = 16


@pytest.fixture(scope="session")
def vdir(tmp_path_factory):
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="session")
def ckpt10(vdir):
    return make_checkpoint(vdir / "digits10.pt", num_classes=10, weight_seed=5)


@pytest.fixture(scope="session")
def onnx10(ckpt10, vdir):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(ckpt10, vdir / "digits10.onnx", ExportSettings(separable=True, verify=False)).path


@pytest.fixture(scope="session")
def fp16_10(onnx10, vdir):
    from atexport.export.precision import convert_precision

    return convert_precision(onnx10, "fp16", vdir / "digits10.fp16.onnx", verify=False).path


def perturbed(onnx_path, out_path, name="blocks.2.adapter.up.weight", delta=0.5):
    """A copy of the model with one adapter weight initializer moved by ``delta`` (one column)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    init = next(i for i in proto.graph.initializer if i.name == name)
    a = numpy_helper.to_array(init).copy()
    a[..., 0] += delta
    init.CopyFrom(numpy_helper.from_array(a, name))
    onnx.save(proto, str(out_path))
    return out_path


def test_verify_passes_honest_artifacts_and_writes_reports(ckpt10, onnx10, fp16_10, vdir):
    from atexport.verify import VerifySettings, verify

    report = vdir / "report"
    res = verify(ckpt10, onnx=onnx10, onnx_fp16=fp16_10,
                 settings=VerifySettings(dataset="digits", split="test", limit=LIMIT, report=report))
    assert res.passed and res.samples == LIMIT
    assert [b.name for b in res.backends] == ["onnxruntime fp32", "onnxruntime fp16"]
    fp32, fp16 = res.backends
    assert fp32.agreement == 1.0 and fp32.parity.max_abs < 1e-4 and fp32.accuracy == res.reference.accuracy
    assert fp16.parity.max_abs > fp32.parity.max_abs  # FP16 is measured, not assumed
    assert all(b.images_per_s > 0 for b in [res.reference, *res.backends])
    assert res.preprocess["passed"] and res.preprocess["max_abs"] <= 1e-5
    doc = json.loads((report / "verify.json").read_text())
    assert doc["passed"] is True and len(doc["backends"]) == 2 and doc["machine"]["cpu"]
    assert doc["backends"][1]["parity"]["tolerance"]["max_rel"] == pytest.approx(1e-2)
    md = (report / "verify.md").read_text()
    assert "| onnxruntime fp16 |" in md and "PASSED" in md
    assert "onnxruntime fp32" in res.table() and "reference" in res.table()


def test_verify_fails_on_a_corrupted_artifact_and_per_block_names_it(ckpt10, onnx10, vdir):
    from click.testing import CliRunner

    from atexport.cli import cli

    bad = perturbed(onnx10, vdir / "corrupt.onnx", "blocks.2.adapter.up.weight")
    res = CliRunner().invoke(cli, [
        "verify", "--ckpt", str(ckpt10), "--onnx", str(onnx10), "--onnx", str(bad), "--dataset", "digits",
        "--limit", str(LIMIT), "--per-block", "--per-block-images", "4", "--report", str(vdir / "bad_report"),
    ])
    assert res.exit_code == ParityError.exit_code, res.output
    assert "Traceback" not in res.output
    err = res.output[res.output.index("error: verification failed"):]
    assert "onnxruntime fp32 (corrupt.onnx)" in err and str(bad) in err and "max abs diff" in err
    assert "digits10.onnx" not in err.split("per block")[0]  # the honest model is not blamed
    assert "the error jumps at blocks.2.adapter" in err
    doc = json.loads((vdir / "bad_report" / "verify.json").read_text())
    assert doc["passed"] is False and [b["passed"] for b in doc["backends"]] == [True, False]
    culprits = {r["artifact"]: r["culprit"] for r in doc["per_block"]}
    assert culprits[str(bad)] == "blocks.2.adapter" and culprits[str(onnx10)] is None


@pytest.mark.parametrize("tensor,stage", [
    ("blocks.0.adapter.down.weight", "blocks.0.adapter"),
    ("blocks.3.adapter.up.weight", "blocks.3.adapter"),
    ("head.weight", "logits"),
])
def test_per_block_names_the_perturbed_stage(ckpt10, onnx10, vdir, tensor, stage):
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.verify import compare_blocks

    bad = perturbed(onnx10, vdir / f"p_{tensor}.onnx", tensor, delta=0.3)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    r = compare_blocks(build_model(load_checkpoint(ckpt10)), bad, x, precision="fp32")
    assert r.first_over == stage, r.table()
    idx = [s.name for s in r.stages].index(stage)
    assert all(s.rel < 1e-5 for s in r.stages[:idx])
    assert stage in r.summary() and "first stage over" in r.summary()


def test_per_block_on_fp16_stays_within_and_maps_every_block(ckpt10, fp16_10):
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.verify import compare_blocks

    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    r = compare_blocks(build_model(load_checkpoint(ckpt10)), fp16_10, x, precision="fp16")
    names = [s.name for s in r.stages]
    assert names[0] == "embed" and names[-1] == "logits"
    for i in range(4):
        assert {f"blocks.{i}.attn", f"blocks.{i}.block", f"blocks.{i}.adapter", f"blocks.{i}"} <= set(names)
    assert r.first_over is None and all(0 < s.rel < 1e-2 for s in r.stages)


def test_tolerance_overrides_decide(ckpt10, fp16_10):
    from atexport.verify import VerifySettings, verify

    settings = VerifySettings(limit=4, overrides={"fp16.max_abs": 1e-9})
    with pytest.raises(ParityError, match=r"onnxruntime fp16 .*max abs diff .* > 1e-09"):
        verify(ckpt10, onnx_fp16=fp16_10, settings=settings)
    res = verify(ckpt10, onnx_fp16=fp16_10, settings=settings, strict=False)
    assert not res.passed and res.failures()[0].startswith("onnxruntime fp16")


def test_verify_refuses_bad_inputs_clearly(ckpt10, onnx10, fp16_10, vdir):
    from click.testing import CliRunner

    from atexport.cli import cli
    from atexport.verify import verify
    from atexport.verify.verify import parse_overrides, resolve_tolerances

    with pytest.raises(BadInputError, match="nothing to verify"):
        verify(ckpt10)
    with pytest.raises(BadInputError, match="--onnx-int8 .*precision fp16.*--onnx-fp16"):
        verify(ckpt10, onnx_int8=fp16_10)
    other = make_checkpoint(vdir / "other_backbone.pt", num_classes=10, seed=7)
    with pytest.raises(IncompatibleCheckpointError, match="other_backbone.pt does not fit .*another backbone"):
        verify(other, onnx=onnx10)
    with pytest.raises(BadInputError, match="--tol int8.bogus"):
        resolve_tolerances("tolerances", {"int8.bogus": 1})
    with pytest.raises(BadInputError, match="KEY=VALUE"):
        parse_overrides(["int8.max_abs"])
    assert resolve_tolerances("tolerances", {"per_block.fp16": "0.5"}).per_block["fp16"] == 0.5
    runner = CliRunner()
    for args, needle in (
        (["--onnx", str(vdir / "missing.onnx")], "missing.onnx: no such file"),
        (["--onnx", str(onnx10), "--dataset", "nope"], "--dataset nope: unknown data set"),
        (["--onnx", str(onnx10), "--tol", "fp32.max_abs"], "KEY=VALUE"),
    ):
        res = runner.invoke(cli, ["verify", "--ckpt", str(ckpt10), *args, "--limit", "2"])
        assert res.exit_code == BadInputError.exit_code, res.output
        assert needle in res.output and "Traceback" not in res.output
