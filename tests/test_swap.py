"""Swapping task weights: file swap and live session equal a fresh export; misfits are refused."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import make_checkpoint, random_inputs, real_photos
from test_export_onnx import export_cached

from atexport.errors import BadInputError, IncompatibleCheckpointError


@pytest.fixture(scope="session")
def swap_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("swap")


@pytest.fixture(scope="session")
def model_a(swap_dir, tiny_ckpt):
    """Separable, simplified export of task A (shared with test_export_onnx when both run)."""
    return export_cached(swap_dir, tiny_ckpt, "sep_every1_slim", separable=True, simplify=True)


@pytest.fixture(scope="session")
def fresh_b(swap_dir, tiny_ckpt_b):
    """A fresh export of task B, the reference every swap must equal."""
    return export_cached(swap_dir, tiny_ckpt_b, "fresh_b", separable=True, simplify=True)


@pytest.fixture(scope="session")
def inputs(model_a):
    from atexport.runtime.preprocess import Preprocessor

    photos = Preprocessor(model_a.metadata.preprocess)(real_photos())
    return np.concatenate([photos, random_inputs(6, seed=3)])


def _run(model, x, batch, optimization="all", **kw):
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.batching import run_batched

    with OnnxRuntimeRunner(model, optimization=optimization, **kw) as r:
        return run_batched(r, x, batch)


@pytest.mark.parametrize("batch", [1, 4])
def test_file_swap_equals_fresh_export(tmp_path, model_a, fresh_b, tiny_ckpt_b, inputs, batch):
    from atexport.export.swap import swap_onnx

    result = swap_onnx(model_a.path, tiny_ckpt_b, tmp_path / "a_to_b.onnx")
    assert result.swapped == len(model_a.metadata.manifest)
    ref = _run(fresh_b.path, inputs, batch)
    got = _run(result.path, inputs, batch)
    assert np.abs(got - ref).max() <= 1e-6  # float32 rounding (in practice 0)
    assert np.abs(got - _run(model_a.path, inputs, batch)).max() > 1e-3  # it did change task


def test_swapped_metadata_and_manifest(tmp_path, model_a, tiny_ckpt_b):
    import onnx

    from atexport.artifact.onnx import check_manifest
    from atexport.export.swap import swap_onnx
    from atexport.artifact.metadata import read_onnx_metadata

    out = swap_onnx(model_a.path, tiny_ckpt_b, tmp_path / "b.onnx", task_name="cars").path
    proto = onnx.load(str(out))
    meta = read_onnx_metadata(proto)
    assert meta.task == "cars" and meta.extra["swap"]["from_task"] == model_a.metadata.task
    assert meta.manifest == model_a.metadata.manifest
    check_manifest(proto, meta.manifest)
    assert meta.extra["parity"] is None  # the export's numbers were for A's weights


def test_swap_back_restores_the_original_weights(tmp_path, model_a, tiny_ckpt, tiny_ckpt_b):
    import onnx

    from atexport.export.swap import swap_onnx

    b = swap_onnx(model_a.path, tiny_ckpt_b, tmp_path / "b.onnx").path
    a = swap_onnx(b, tiny_ckpt, tmp_path / "a.onnx").path
    def inits(path):
        return {i.name: i.SerializeToString() for i in onnx.load(str(path)).graph.initializer}

    assert inits(a) == inits(model_a.path)


@pytest.mark.parametrize("optimization", ["disable", "basic", "extended", "all"])
def test_live_swap_exact_at_every_optimisation_level(model_a, fresh_b, tiny_ckpt_b, inputs, optimization):
    """Feeding the overridable initializers is exact even where ORT constant-folds (unlike add_initializer)."""
    from atexport.checkpoint import load_checkpoint
    from atexport.runtime.session import AdapterSession

    ref_b = _run(fresh_b.path, inputs, 4, optimization)  # fresh export of B, same optimisation level
    ref_a = _run(model_a.path, inputs, 4, optimization)
    with AdapterSession(model_a.path, optimization=optimization) as sess:
        np.testing.assert_array_equal(sess.infer(inputs), ref_a)
        name = sess.swap(load_checkpoint(tiny_ckpt_b))
        assert name == "tiny_b" and sess.task == "tiny_b"
        assert np.abs(sess.infer(inputs) - ref_b).max() <= 1e-6
        np.testing.assert_array_equal(sess.infer(inputs, task=None), ref_a)  # per-call choice
        sess.use(None)
        np.testing.assert_array_equal(sess.infer(inputs), ref_a)


def test_live_session_api(model_a, fresh_b, tiny_ckpt_b, inputs):
    from atexport.artifact.fit import check_fits
    from atexport.checkpoint import load_checkpoint
    from atexport.runtime.session import AdapterSession
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    ref_b = _run(fresh_b.path, inputs, 4)
    # a session created with the task's weights
    with AdapterSession(model_a.path, ckpt=load_checkpoint(tiny_ckpt_b)) as sess:
        assert np.abs(sess.infer(inputs) - ref_b).max() <= 1e-6
        # torch-free: plain arrays keyed by tensor name
        import onnx

        meta = read_onnx_metadata(onnx.load(str(model_a.path)))
        weights = check_fits(meta, load_checkpoint(tiny_ckpt_b).task_weights())
        sess.swap(weights=weights, name="b-arrays")
        assert np.abs(sess.infer(inputs) - ref_b).max() <= 1e-6
        assert set(sess.tasks) == {"tiny_b", "b-arrays"}
        bad = dict(weights)
        bad["head.weight"] = bad["head.weight"][:2]
        with pytest.raises(IncompatibleCheckpointError, match="head.weight"):
            sess.swap(weights=bad, name="bad")
        with pytest.raises(BadInputError, match="no task"):
            sess.use("nope")
    # the plain runner takes the same feeds
    with OnnxRuntimeRunner(model_a.path, feeds=weights) as r:
        assert np.abs(r.infer(inputs) - ref_b).max() <= 1e-6


def test_live_session_refuses_fused_model(swap_dir, tiny_ckpt):
    from atexport.runtime.session import AdapterSession

    fused = export_cached(swap_dir, tiny_ckpt, "fused")
    with pytest.raises(IncompatibleCheckpointError, match="--separable"):
        AdapterSession(fused.path).activate()


# ------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="session")
def misfits(tmp_path_factory):
    d = tmp_path_factory.mktemp("misfits")
    return {
        "fingerprint": make_checkpoint(d / "other_backbone.pt", seed=5),
        "rank": make_checkpoint(d / "rank8.pt", rank=8),
        "placement": make_checkpoint(d / "every2.pt", every=2),
        "classes": make_checkpoint(d / "classes7.pt", num_classes=7),
    }


@pytest.mark.parametrize(
    "kind,match",
    [
        ("fingerprint", "backbone fingerprint"),
        ("rank", "adapter rank 8 != the model's 4"),
        ("placement", "placement every=2"),
        ("classes", "7 classes != the model's 5"),
    ],
)
def test_misfit_checkpoints_are_refused(tmp_path, model_a, misfits, kind, match):
    from atexport.export.swap import swap_onnx
    from atexport.checkpoint import load_checkpoint
    from atexport.runtime.session import AdapterSession

    out = tmp_path / "out.onnx"
    with pytest.raises(IncompatibleCheckpointError, match=match):
        swap_onnx(model_a.path, misfits[kind], out)
    assert not out.exists()
    with AdapterSession(model_a.path) as sess, pytest.raises(IncompatibleCheckpointError, match=match):
        sess.swap(load_checkpoint(misfits[kind]))


def test_alpha_is_checked(model_a, tiny_ckpt_b):
    from atexport.checkpoint import load_checkpoint
    from atexport.artifact.fit import check_fits

    ckpt = load_checkpoint(tiny_ckpt_b)
    check_fits(model_a.metadata, ckpt.task_weights())
    ckpt.adapter.alpha = 2.0
    with pytest.raises(IncompatibleCheckpointError, match="alpha"):
        check_fits(model_a.metadata, ckpt.task_weights())


def test_fused_model_is_refused(tmp_path, swap_dir, tiny_ckpt, tiny_ckpt_b):
    from atexport.export.swap import swap_onnx

    fused = export_cached(swap_dir, tiny_ckpt, "fused")
    with pytest.raises(IncompatibleCheckpointError, match="without --separable"):
        swap_onnx(fused.path, tiny_ckpt_b, tmp_path / "x.onnx")


def test_corrupt_onnx_missing_ckpt_unwritable_output(tmp_path, model_a, tiny_ckpt_b):
    from atexport.export.swap import swap_onnx

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    with pytest.raises(BadInputError, match="not a readable ONNX model"):
        swap_onnx(bad, tiny_ckpt_b, tmp_path / "x.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_a.path.read_bytes()[:5000])
    with pytest.raises(BadInputError, match="not a readable ONNX model"):
        swap_onnx(truncated, tiny_ckpt_b, tmp_path / "x.onnx")
    with pytest.raises(BadInputError, match="no such ONNX file"):
        swap_onnx(tmp_path / "none.onnx", tiny_ckpt_b, tmp_path / "x.onnx")
    with pytest.raises(BadInputError, match="no such checkpoint"):
        swap_onnx(model_a.path, tmp_path / "none.pt", tmp_path / "x.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInputError, match="not a folder"):
        swap_onnx(model_a.path, tiny_ckpt_b, blocker / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_swap(tmp_path, model_a, fresh_b, tiny_ckpt_b, misfits, inputs):
    from click.testing import CliRunner

    from atexport.cli import cli
    from atexport.errors import IncompatibleCheckpointError as ICE

    runner = CliRunner()
    out = tmp_path / "b.onnx"
    res = runner.invoke(cli, ["swap", "--onnx", str(model_a.path), "--ckpt", str(tiny_ckpt_b), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "swapped 18 tensors" in res.output and out.is_file()
    assert np.abs(_run(out, inputs, 4) - _run(fresh_b.path, inputs, 4)).max() <= 1e-6

    out2 = tmp_path / "r.onnx"
    res = runner.invoke(cli, ["swap", "--onnx", str(model_a.path), "--ckpt", str(misfits["rank"]), "-o", str(out2)])
    assert res.exit_code == ICE.exit_code and "adapter rank 8" in res.output and "Traceback" not in res.output
    assert not out2.exists()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nonsense")
    res = runner.invoke(cli, ["swap", "--onnx", str(bad), "--ckpt", str(tiny_ckpt_b), "-o", str(out2)])
    assert res.exit_code == BadInputError.exit_code and "not a readable ONNX model" in res.output
    res = runner.invoke(cli, ["swap", "--ckpt", str(tiny_ckpt_b)])
    assert res.exit_code == BadInputError.exit_code and "--onnx" in res.output


def test_swap_with_verify(tmp_path, model_a, tiny_ckpt_b):
    from atexport.export.swap import swap_onnx

    result = swap_onnx(model_a.path, tiny_ckpt_b, tmp_path / "b.onnx", verify=True)
    assert result.parity and all(r.passed for r in result.parity)
    assert all(r["passed"] for r in result.metadata.extra["parity"])


# ------------------------------------------------------------------------------------------- swap --engine


def _fake_engine(folder, onnx_path, refit=True):
    """An engine file with the sidecar 'atexport trt [--refit]' writes for ``onnx_path`` (no TensorRT needed)."""
    import hashlib
    import json

    from atexport.artifact.onnx import read_onnx
    from atexport.artifact.sidecar import sidecar_path
    from atexport.export.tensorrt.plan import EngineOptions, engine_sidecar, plan_build
    from atexport.artifact.metadata import read_onnx_metadata

    folder.mkdir(parents=True, exist_ok=True)
    meta = read_onnx_metadata(read_onnx(onnx_path), str(onnx_path))
    engine = folder / "a.engine"
    engine.write_bytes(b"engine bytes")
    side = engine_sidecar(meta, plan_build(meta, "10.13.3.9", EngineOptions(refit=refit)),
                          device={"name": "NVIDIA H100", "compute_capability": [9, 0]}, engine_path=engine,
                          engine_sha256=hashlib.sha256(b"engine bytes").hexdigest(), engine_bytes=12,
                          onnx_path=onnx_path, onnx_sha256=None)
    sidecar_path(engine).write_text(json.dumps(side))
    return engine


def test_cli_swap_engine_refusals(tmp_path, model_a, tiny_ckpt_b, misfits):
    """The --engine branch runs refit_engine's real checks; all of them come before TensorRT is needed."""
    import importlib.util

    from click.testing import CliRunner

    from atexport.cli import cli
    from atexport.errors import MissingDependencyError

    runner = CliRunner()
    engine = _fake_engine(tmp_path, model_a.path)
    out = tmp_path / "b.engine"
    res = runner.invoke(cli, ["swap", "--onnx", str(model_a.path), "--engine", str(engine), "--ckpt", str(tiny_ckpt_b)])
    assert res.exit_code == BadInputError.exit_code and "either --onnx" in res.output and "not both" in res.output
    res = runner.invoke(cli, ["swap", "--engine", str(engine), "--ckpt", str(misfits["rank"]), "-o", str(out)])
    assert res.exit_code == IncompatibleCheckpointError.exit_code and "adapter rank 8" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["swap", "--engine", str(engine), "--ckpt", str(tiny_ckpt_b), "--verify"])
    assert res.exit_code == BadInputError.exit_code and "atexport verify" in res.output
    plain = _fake_engine(tmp_path / "plain", model_a.path, refit=False)
    res = runner.invoke(cli, ["swap", "--engine", str(plain), "--ckpt", str(tiny_ckpt_b), "-o", str(out)])
    assert res.exit_code == BadInputError.exit_code and "not refittable" in res.output and "--refit" in res.output
    res = runner.invoke(cli, ["swap", "--engine", str(tmp_path / "none.engine"), "--ckpt", str(tiny_ckpt_b)])
    assert res.exit_code == BadInputError.exit_code and "none.engine" in res.output
    if importlib.util.find_spec("tensorrt") is None:
        res = runner.invoke(cli, ["swap", "--engine", str(engine), "--ckpt", str(tiny_ckpt_b), "-o", str(out)])
        assert res.exit_code == MissingDependencyError.exit_code, res.output
        assert "TensorRT's Python package is not installed" in res.output and "atexport[tensorrt]" in res.output
        assert "Traceback" not in res.output and not out.exists()


def test_default_names_are_the_same_in_every_command(tmp_path, tiny_ckpt, tiny_ckpt_b):
    """One name for one thing: ``runs/cars/run.pt`` is task "cars" everywhere. A file written beside the
    checkpoint keeps its name (``runs/cars/run.onnx``: the run folder names the task); a file written beside
    another task's model is named by the task (``cars.onnx``). The help texts say so."""
    import shutil

    from click.testing import CliRunner

    from atexport.cli import cli
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.export.swap import swap_onnx

    for task, src in (("birds", tiny_ckpt), ("cars", tiny_ckpt_b)):
        (tmp_path / "runs" / task).mkdir(parents=True)
        shutil.copy(src, tmp_path / "runs" / task / "run.pt")
    birds = export_onnx(tmp_path / "runs/birds/run.pt", settings=ExportSettings(separable=True, verify=False))
    assert birds.path == tmp_path / "runs/birds/run.onnx" and birds.metadata.task == "birds"
    cars = swap_onnx(birds.path, tmp_path / "runs/cars/run.pt")
    assert cars.path == tmp_path / "runs/birds/cars.onnx" and cars.metadata.task == "cars"

    runner = CliRunner()
    onnx_help = " ".join(runner.invoke(cli, ["onnx", "--help"]).output.split())
    swap_help = " ".join(runner.invoke(cli, ["swap", "--help"]).output.split())
    assert "runs/cars/run.pt -> runs/cars/run.onnx" in onnx_help and "cars.onnx" in swap_help
    for text in (onnx_help, swap_help, " ".join(runner.invoke(cli, ["tasks", "add", "--help"]).output.split())):
        assert "the run folder's name for runs/NAME/run.pt" in text and "checkpoint stem" not in text
