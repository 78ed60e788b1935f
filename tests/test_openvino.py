"""OpenVINO runner and IR export: real OpenVINO against real ONNX Runtime on tiny ViTs exported in the test.

Models come from the real exporters (``export_onnx``, ``export_multitask``, ``quantize_int8``) once per
session; each OpenVINO compile of the tiny ViT takes ~0.1 s.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openvino", reason="needs the openvino package: pip install 'atexport[openvino]'")

from _helpers import random_inputs

from atexport.errors import (
    BadInputError,
    IncompatibleCheckpointError,
    MissingDependencyError,
    ParityError,
)


@pytest.fixture(scope="session")
def ov_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="session")
def fused(tiny_ckpt, ov_dir):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(tiny_ckpt, ov_dir / "fused.onnx", ExportSettings(verify=False)).path


@pytest.fixture(scope="session")
def sep(tiny_ckpt, ov_dir):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(tiny_ckpt, ov_dir / "sep.onnx", ExportSettings(separable=True, verify=False)).path


@pytest.fixture(scope="session")
def sep_b(tiny_ckpt_b, ov_dir):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(tiny_ckpt_b, ov_dir / "sep_b.onnx", ExportSettings(separable=True, verify=False)).path


@pytest.fixture(scope="session")
def int8(fused, ov_dir):
    from atexport.export.precision import Int8Options, quantize_int8

    return quantize_int8(fused, ov_dir / "fused.int8.onnx", "digits", verify=False,
                         options=Int8Options(count=64, keep_float="none")).path


@pytest.fixture(scope="session")
def multitask(tiny_ckpt, tiny_ckpt_b, ov_dir):
    from atexport.export.multitask import export_multitask
    from atexport.export.settings import ExportSettings

    return export_multitask([tiny_ckpt, tiny_ckpt_b], ov_dir / "mt.onnx", ExportSettings(verify=False)).path


@pytest.fixture(scope="session")
def photos_batch(fused):
    import onnx

    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.parity.images import photo_batch

    meta = read_onnx_metadata(onnx.load(str(fused)))
    return photo_batch(meta.preprocess)


def _weights_of(path) -> dict:
    """The swappable tensors stored in a separable ONNX file (torch-free task weights)."""
    import onnx
    from onnx import numpy_helper

    from atexport.artifact.metadata import read_onnx_metadata

    proto = onnx.load(str(path))
    inits = {e.get("initializer", k) for k, e in read_onnx_metadata(proto).manifest.items()}
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name in inits}


def _ort(path):
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(str(path))


def _has(cap: str) -> bool:
    from atexport.runtime.openvino import cpu_capabilities

    return cap in cpu_capabilities()


# ---------------------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("model", ["fused", "sep"])
def test_fp32_matches_onnxruntime(model, request, photos_batch):
    from atexport.runtime.openvino import OpenVINORunner

    path = request.getfixturevalue(model)
    x = np.concatenate([photos_batch, random_inputs(4)])
    with _ort(path) as ref, OpenVINORunner(str(path), precision="fp32") as ov:
        a, b = ref.infer(x), ov.infer(x)
        assert (ov.precision, ov.inference_precision) == ("fp32", "fp32")
    assert a.shape == b.shape == (len(x), 5)
    assert np.abs(a - b).max() <= 1e-4
    assert (a.argmax(1) == b.argmax(1)).all()


def test_default_precision_is_the_files_not_the_cpus(fused):
    """OpenVINO alone would run an FP32 file in BF16 on an AMX CPU; the runner says fp32 unless asked."""
    from atexport.runtime.openvino import OpenVINORunner

    with OpenVINORunner(str(fused)) as ov:
        assert ov.precision == "fp32" and ov.inference_precision == "fp32"
        assert ov.config()["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.parametrize("precision,cap", [("bf16", "BF16"), ("fp16", "FP16")])
def test_low_precision_top1_on_photos(precision, cap, fused, photos_batch):
    from atexport.parity.compare import compare, load_tolerances
    from atexport.runtime.openvino import OpenVINORunner

    if not _has(cap):
        pytest.skip(f"this CPU cannot run {cap} in OpenVINO")
    with _ort(fused) as ref, OpenVINORunner(str(fused), precision=precision) as ov:
        a, b = ref.infer(photos_batch), ov.infer(photos_batch)
        assert ov.precision == ov.inference_precision == precision
    res = compare(a, b, load_tolerances()[precision], name=precision)
    assert res.passed, res.failures
    assert 0 < res.max_abs  # it really ran in low precision (FP32 would be ~1e-6)
    assert res.top1_agreement >= 0.9


def test_int8_qdq_runs_in_int8(int8, fused, photos_batch):
    from atexport.parity.compare import compare, load_tolerances
    from atexport.runtime.openvino import OpenVINORunner

    with _ort(int8) as ref_q, _ort(fused) as ref_f, OpenVINORunner(str(int8)) as ov:
        y = ov.infer(photos_batch)
        assert ov.precision == "int8" and ov.inference_precision == "fp32"
        low, total = ov.int8_layers
        assert low >= 16 and low <= total  # 4 blocks x (qkv, proj, fc1, fc2) at least
        same_file = compare(ref_q.infer(photos_batch), y, load_tolerances()["int8"])
        vs_fp32 = compare(ref_f.infer(photos_batch), y, load_tolerances()["int8"])
    assert same_file.passed and same_file.max_rel < 0.05
    assert vs_fp32.passed, vs_fp32.failures


def test_int8_with_bf16_float_ops(int8, photos_batch):
    from atexport.parity.compare import compare, load_tolerances
    from atexport.runtime.openvino import OpenVINORunner

    if not _has("BF16"):
        pytest.skip("this CPU cannot run BF16 in OpenVINO")
    with _ort(int8) as ref, OpenVINORunner(str(int8), precision="int8+bf16") as ov:
        res = compare(ref.infer(photos_batch), ov.infer(photos_batch), load_tolerances()["int8"])
        assert (ov.precision, ov.inference_precision) == ("int8+bf16", "bf16") and ov.int8_layers[0] >= 16
    assert res.passed, res.failures


def test_separable_live_swap_equals_onnxruntime(sep, sep_b):
    from atexport.runtime.openvino import OpenVINORunner
    from atexport.runtime.session import AdapterSession

    x = random_inputs(3, seed=4)
    wb = _weights_of(sep_b)
    with AdapterSession(str(sep)) as ort_s, OpenVINORunner(str(sep)) as ov, _ort(sep_b) as file_b:
        assert ov.separable and ov.tasks == []
        ort_s.add_task(weights=wb, name="b")
        assert ov.swap(weights=wb, name="b") == "b" and ov.task == "b"
        y_b = ov.infer(x)
        assert np.abs(y_b - ort_s.infer(x, task="b")).max() <= 1e-4
        assert np.abs(y_b - file_b.infer(x)).max() <= 1e-4
        own = ov.infer(x, task=None)
        assert np.abs(own - ort_s.infer(x, task=None)).max() <= 1e-4
        assert np.abs(own - y_b).max() > 0.1  # the swap changed the logits
        ov.remove("b")
        assert ov.task is None and np.array_equal(ov.infer(x), own)


@pytest.mark.parametrize("weights,err", [
    (lambda w: {k: v for k, v in list(w.items())[1:]}, "missing tensors"),
    (lambda w: {**w, next(iter(w)): np.zeros((3, 3), np.float32)}, "shape"),
])
def test_separable_refuses_weights_that_do_not_fit(weights, err, sep):
    from atexport.runtime.openvino import OpenVINORunner

    with OpenVINORunner(str(sep)) as ov, pytest.raises(IncompatibleCheckpointError, match=err):
        ov.add_task(weights=weights(_weights_of(sep)), name="bad")


def test_fused_model_cannot_swap(fused, sep):
    from atexport.runtime.openvino import OpenVINORunner

    with OpenVINORunner(str(fused)) as ov, pytest.raises(IncompatibleCheckpointError, match="--separable"):
        ov.add_task(weights=_weights_of(sep), name="b")


def test_multitask_mixed_task_ids_equal_onnxruntime(multitask):
    from atexport.runtime.openvino import OpenVINORunner

    x = random_inputs(6, seed=5)
    ids = np.array([0, 1, 1, 0, 1, 0], dtype=np.int64)
    with _ort(multitask) as ref, OpenVINORunner(str(multitask)) as ov:
        a, b = ref.infer(x, task_id=ids), ov.infer(x, task_id=ids)
        assert ov.input_name == "input"
    assert np.abs(a - b).max() <= 1e-4


def test_open_openvino_modes(fused, sep, multitask, tmp_path):
    from atexport.runtime.openvino import open_openvino

    for path, mode in ((fused, "single"), (sep, "separable"), (multitask, "multitask")):
        opened = open_openvino(path)
        meta, runner, got = opened.meta, opened.runner, opened.mode
        assert got == mode and runner.is_active and meta.backbone["name"] == "vit_tiny_patch16_224"
        runner.deactivate()
    with pytest.raises(BadInputError, match="no atexport metadata"):
        open_openvino(_no_metadata(tmp_path))


def test_runtime_openvino_is_torch_free(sep):
    code = (
        "import sys, numpy as np\n"
        "from atexport.runtime.openvino import OpenVINORunner\n"
        f"r = OpenVINORunner({str(sep)!r}).activate()\n"
        "print(r.infer(np.zeros((1, 3, 32, 32), np.float32)).shape)\n"
        "print(sorted(m for m in ('torch', 'timm', 'onnxruntime', 'onnx', 'atexport.export') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["(1, 5)", "[]"]


def test_missing_openvino_names_the_extra(monkeypatch, fused):
    import atexport.runtime.openvino as rov

    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the package looks like
    monkeypatch.setattr(rov, "_CORE", None)
    with pytest.raises(MissingDependencyError, match=r"atexport\[openvino\]"):
        rov.OpenVINORunner(str(fused)).activate()


# ---------------------------------------------------------------------------------------------- IR export


def test_ir_round_trip_keeps_metadata_and_logits(sep, sep_b, ov_dir):
    import onnx

    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.export.openvino import to_openvino
    from atexport.runtime.openvino import OpenVINORunner, read_metadata, read_ov_model

    res = to_openvino(sep, ov_dir / "ir" / "sep.xml")
    assert res.passed and res.parity and max(r.max_abs for r in res.parity) <= 1e-4
    assert res.path.is_file() and res.path.with_suffix(".bin").is_file()
    assert res.cache_dir is not None and any(res.cache_dir.iterdir())
    src = read_onnx_metadata(onnx.load(str(sep)))
    got = read_metadata(read_ov_model(res.path))
    for key in ("backbone", "preprocess", "class_names", "manifest", "adapter", "input", "separable"):
        assert getattr(got, key) == getattr(src, key), key
    assert got.extra["openvino"]["precision"] == "fp32" and got.extra["openvino"]["parity"]
    x = random_inputs(2, seed=7)
    with OpenVINORunner(str(res.path), cache_dir=res.cache_dir) as ov, _ort(sep_b) as file_b:
        assert ov.separable
        ov.swap(weights=_weights_of(sep_b), name="b")  # the IR swaps tasks like the ONNX file
        assert np.abs(ov.infer(x) - file_b.infer(x)).max() <= 1e-4


def test_bf16_ir_runs_bf16_by_default(fused, ov_dir):
    from atexport.export.openvino import to_openvino
    from atexport.runtime.openvino import OpenVINORunner

    if not _has("BF16"):
        pytest.skip("this CPU cannot run BF16 in OpenVINO")
    res = to_openvino(fused, precision="bf16", cache_dir=False)
    assert res.path == fused.with_name("fused.bf16.xml") and res.passed
    assert all(r.top1_agreement >= 0.9 for r in res.parity)
    with OpenVINORunner(str(res.path)) as ov:
        assert ov.precision == "bf16"


def test_int8_ir(int8):
    from atexport.export.openvino import to_openvino

    res = to_openvino(int8, cache_dir=False)
    assert res.path.name == "fused.int8.xml" and res.precision == "int8" and res.passed
    assert res.metadata.extra["openvino"]["int8_layers"][0] >= 16


def test_parity_failure_keeps_failed_ir(fused, ov_dir, tmp_path):
    from atexport.export.openvino import to_openvino

    if not _has("BF16"):
        pytest.skip("this CPU cannot run BF16 in OpenVINO")
    strict = tmp_path / "strict.yaml"
    strict.write_text("tolerances:\n  bf16: {max_abs: 1.0e-9, max_rel: 1.0e-9, min_cosine: 1.0, min_top1_agreement: 1.0}\n")
    out = ov_dir / "strict.xml"
    with pytest.raises(ParityError, match="strict.failed.xml") as e:
        to_openvino(fused, out, precision="bf16", cache_dir=False,
                    config={"parity": {"tolerances": str(strict), "batch_sizes": [2], "max_images": 4}})
    assert not out.exists() and not out.with_suffix(".bin").exists()
    assert (ov_dir / "strict.failed.xml").is_file() and (ov_dir / "strict.failed.bin").is_file()
    assert e.value.result.failed_path == ov_dir / "strict.failed.xml"


def _not_onnx(tmp):
    p = tmp / "fake.onnx"
    p.write_text("not a model")
    return p


def _copy(src, dst):
    import shutil

    return shutil.copy(src, dst)


def _no_metadata(tmp):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    p = tmp / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(p))
    return p


@pytest.mark.parametrize("source,kwargs,err,match", [
    (lambda t, f, q: t / "missing.onnx", {}, BadInputError, "no such file"),
    (lambda t, f, q: _not_onnx(t), {}, BadInputError, "cannot read"),
    (lambda t, f, q: _no_metadata(t), {}, BadInputError, "no atexport metadata"),
    (lambda t, f, q: f, {"precision": "int4"}, BadInputError, "expected one of"),
    (lambda t, f, q: f, {"precision": "int8"}, BadInputError, "no Q/DQ layers"),
    (lambda t, f, q: f, {"precision": "int8+bf16"}, BadInputError, "no Q/DQ layers"),
    (lambda t, f, q: q, {"precision": "bf16"}, BadInputError, "INT8 \\(Q/DQ\\) model"),
    (lambda t, f, q: q, {"precision": "fp16"}, BadInputError, "give the FP32 model"),
    (lambda t, f, q: f, {"output": "model.onnx"}, BadInputError, "ending in .xml"),
    (lambda t, f, q: _copy(f, t / "model.pt"), {}, BadInputError, "expected an .onnx"),
])
def test_bad_inputs(source, kwargs, err, match, fused, int8, tmp_path):
    from atexport.export.openvino import to_openvino

    kwargs = dict(kwargs)
    output = kwargs.pop("output", None)
    with pytest.raises(err, match=match):
        to_openvino(source(tmp_path, fused, int8), tmp_path / output if output else None, cache_dir=False, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "int4"}, "expected one of"),
    ({"threads": 0}, "at least 1"),
    ({"performance_hint": "fast"}, "LATENCY or THROUGHPUT"),
])
def test_runner_bad_arguments(kwargs, match, fused):
    from atexport.runtime.openvino import OpenVINORunner

    with pytest.raises(BadInputError, match=match):
        OpenVINORunner(str(fused), **kwargs)


def test_runner_bad_feeds(fused, multitask):
    from atexport.runtime.openvino import OpenVINORunner

    with OpenVINORunner(str(fused)) as ov, pytest.raises(BadInputError, match="no input named 'task_id'"):
        ov.infer(random_inputs(1), task_id=np.zeros(1, np.int64))
    with OpenVINORunner(str(fused)) as ov, pytest.raises(BadInputError, match="could not run this batch"):
        ov.infer(np.zeros((1, 3, 16, 16), np.float32))



def test_ir_without_its_bin(fused, tmp_path):
    from atexport.export.openvino import to_openvino
    from atexport.runtime.openvino import OpenVINORunner

    res = to_openvino(fused, tmp_path / "m.xml", verify=False, cache_dir=False)
    res.path.with_suffix(".bin").unlink()
    with pytest.raises(BadInputError, match="m.bin are missing"):
        OpenVINORunner(str(res.path)).activate()


def test_cli(fused, ov_dir):
    from click.testing import CliRunner

    from atexport.cli import cli

    out = ov_dir / "cli.xml"
    res = CliRunner().invoke(cli, ["openvino", "--onnx", str(fused), "-o", str(out), "--no-cache"])
    assert res.exit_code == 0, res.output
    assert "parity against ONNX Runtime (fp32 tolerances)" in res.output and out.is_file()
    bad = CliRunner().invoke(cli, ["openvino", "--onnx", str(ov_dir / "nope.onnx")])
    assert bad.exit_code == 2 and "no such file" in bad.output


# ---------------------------------------------------------------------------------------------- wiring (phase 2)


def _ort_logits(path, x, **feeds):
    with _ort(path) as r:
        return r.infer(x, **feeds)


def test_load_model_openvino_single_separable_multitask(fused, sep, sep_b, multitask, ov_dir):
    from atexport.export.openvino import to_openvino
    from atexport.runtime import load_model

    x = random_inputs(3, seed=11)
    with load_model(fused, backend="openvino") as m:
        assert (m.backend, m.precision, m.mode) == ("openvino", "fp32", "single")
        assert np.abs(m.logits(x) - _ort_logits(fused, x)).max() <= 1e-4
    ir = to_openvino(fused, ov_dir / "load" / "fused.xml", verify=False, cache_dir=False).path
    with load_model(ir) as m:  # an IR runs in OpenVINO by default
        assert m.backend == "openvino" and np.abs(m.logits(x) - _ort_logits(fused, x)).max() <= 1e-4
    with load_model(sep, backend="openvino", threads=1) as m:
        assert m.mode == "separable" and m.runner.threads == 1
        m.add_task(_weights_of(sep_b), name="b")  # the live swap: no recompile
        both = m.logits(x, task=["b", None, "b"])
        assert np.abs(both[[0, 2]] - _ort_logits(sep_b, x[[0, 2]])).max() <= 1e-4
        assert np.abs(both[1] - _ort_logits(sep, x[1:2])[0]).max() <= 1e-4
        assert m.set_task("b") == "b" and m.predict(x, top_k=2)[0].task == "b"
    with load_model(multitask, backend="openvino") as m:
        names = m.tasks
        ids = np.array([0, 1, 0], dtype=np.int64)
        got = m.logits(x, task=[names[i] for i in ids])
        assert np.abs(got - _ort_logits(multitask, x, task_id=ids)).max() <= 1e-4


def test_load_model_runs_the_precision_asked(fused, int8):
    from atexport.runtime import load_model

    with load_model(int8, backend="openvino") as m:
        assert m.precision == "int8" and m.metadata.precision == "int8"
    if not _has("BF16"):
        pytest.skip("this CPU cannot run BF16 in OpenVINO")
    with load_model(fused, backend="openvino", precision="bf16") as m:
        assert m.precision == "bf16" and "bf16" in repr(m)


@pytest.mark.parametrize("name,kwargs,match", [
    ("fused.onnx", {"backend": "openvino", "providers": ["CPUExecutionProvider"]}, "--provider CPUExecutionProvider"),
    ("fused.onnx", {"precision": "bf16"}, "--precision bf16: ONNX Runtime"),
    ("fused.onnx", {"backend": "onnxruntime", "precision": "int8"}, "--precision int8: ONNX Runtime"),
    ("fused.onnx", {"backend": "tvm"}, "--backend tvm: expected one of onnxruntime, openvino"),
    ("m.xml", {"backend": "onnxruntime"}, "OpenVINO IR, which runs in OpenVINO only"),
    ("m.engine", {"precision": "fp16"}, "--precision fp16: a TensorRT engine"),
    ("m.engine", {"backend": "openvino"}, "runs in TensorRT only"),
])
def test_load_model_refuses_options_the_backend_cannot_use(name, kwargs, match, fused, tmp_path):
    from atexport.runtime import load_model

    path = fused if name == "fused.onnx" else tmp_path / name
    if path != fused:
        path.write_bytes(b"not read: the options are checked first")
    with pytest.raises(BadInputError, match=match) as e:
        load_model(path, **kwargs)
    assert e.value.exit_code == 2


def test_predict_cli_says_what_ran(fused, tmp_path):
    import json

    from click.testing import CliRunner
    from PIL import Image

    from atexport.cli import cli

    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img)
    res = CliRunner().invoke(cli, ["predict", "--model", str(fused), "--backend", "openvino", "--precision", "fp32",
                                   "--top-k", "1", str(img)])
    assert res.exit_code == 0, res.output
    assert "openvino CPU fp32" in res.output and "a.png:" in res.output
    res = CliRunner().invoke(cli, ["predict", "--model", str(fused), "--backend", "openvino", "--json", str(img)])
    doc = json.loads(res.output)
    assert (doc["backend"], doc["precision"], doc["file_precision"]) == ("openvino", "fp32", "fp32")
    res = CliRunner().invoke(cli, ["predict", "--model", str(fused), "--precision", "bf16", str(img)])
    assert res.exit_code == 2 and "ONNX Runtime runs a model at the precision of its file" in res.output


def test_read_artifact_labels_what_ran(fused, int8):
    from atexport.runtime.artifacts import Artifact, artifacts, read_artifact

    items = artifacts(onnx=fused, openvino=[fused, int8])
    assert [(a.runs_in, a.flag) for a in items] == [("onnxruntime", "--onnx"), ("openvino", "--openvino"),
                                                    ("openvino", "--openvino")]
    loaded = [read_artifact(a) for a in items]
    assert [(i.backend, i.precision, i.tolerance) for i in loaded] == [
        ("onnxruntime", "fp32", "fp32"), ("openvino", "fp32", "fp32"), ("openvino", "int8", "int8")]
    if _has("BF16"):
        i = read_artifact(Artifact(int8, "--openvino", "int8+bf16", "openvino"))
        assert (i.precision, i.tolerance) == ("int8+bf16", "int8")  # held to the int8 row
    for i in loaded:
        i.runner.deactivate()


@pytest.fixture(scope="session")
def digits_models(ov_dir):
    from _helpers import make_checkpoint

    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.export.openvino import to_openvino

    ckpt = make_checkpoint(ov_dir / "digits10.pt", num_classes=10, weight_seed=5)
    onnx_path = export_onnx(ckpt, ov_dir / "digits10.onnx", ExportSettings(verify=False)).path
    return ckpt, onnx_path, to_openvino(onnx_path, verify=False, cache_dir=False).path


def test_verify_openvino_rows(digits_models):
    from atexport.runtime.artifacts import Artifact
    from atexport.verify import VerifySettings, verify

    ckpt, onnx_path, ir = digits_models
    extra = [Artifact(onnx_path, "--openvino", "bf16", "openvino")] if _has("BF16") else []
    res = verify(ckpt, extra, onnx=onnx_path, openvino=ir,
                 settings=VerifySettings(dataset="digits", limit=16, per_block=True))
    rows = {b.name: b for b in res.backends}
    assert {"onnxruntime fp32", "openvino fp32"} <= set(rows) and res.passed, res.failures()
    assert rows["openvino fp32"].parity.max_abs <= 1e-4 and rows["openvino fp32"].agreement == 1.0
    if extra:
        bf16 = rows["openvino bf16"]
        assert bf16.precision == "bf16" and bf16.parity.tolerance.max_rel == pytest.approx(5e-2)
        assert bf16.parity.max_abs > rows["openvino fp32"].parity.max_abs  # BF16 is measured, not assumed
    assert "openvino fp32" in res.table() and any("runs in OpenVINO" in n for n in res.notes)


def test_verify_cli_openvino(digits_models):
    from click.testing import CliRunner

    from atexport.cli import cli

    ckpt, onnx_path, ir = digits_models
    args = ["verify", "--ckpt", str(ckpt), "--openvino", str(onnx_path), "--limit", "8", "--no-progress"]
    res = CliRunner().invoke(cli, args + ["--openvino-precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert "openvino fp32" in res.output and "verification passed" in res.output
    res = CliRunner().invoke(cli, ["verify", "--ckpt", str(ckpt), "--onnx", str(onnx_path), "--openvino-precision",
                                   "bf16", "--limit", "8"])
    assert res.exit_code == 2 and "--openvino-precision bf16: give the models" in res.output
