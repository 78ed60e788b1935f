"""TensorRT build planning for 10.x and 11.x (no TensorRT needed), the sidecar and its compatibility
check, the missing-TensorRT path of ``atexport trt``; engine builds and refit where TensorRT is installed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from atexport.errors import BadInputError, IncompatibleCheckpointError, MissingDependencyError
from atexport.export.trt_plan import (
    BuildPlan,
    check_compatible,
    engine_sidecar,
    parse_batch_range,
    plan_build,
    rebuild_command,
)
from atexport.metadata import ModelMetadata


def _meta(precision="fp16", batch="batch", separable=False):
    manifest = {}
    if separable:
        manifest = {n: {"initializer": n, "shape": [4, 64], "dtype": "float32"}
                    for n in ("blocks.0.adapter.down.weight", "head.weight")}
    return ModelMetadata(
        backbone={"name": "vit_tiny_patch16_224", "fingerprint": "ab" * 32, "model_args": {}, "source": {}},
        input={"name": "input", "shape": [batch, 3, 32, 32], "dtype": "float32", "layout": "NCHW"},
        output={"name": "logits", "shape": [batch, 5]},
        preprocess={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
        class_names=[f"c{i}" for i in range(5)], num_classes=5, precision=precision,
        separable=separable, manifest=manifest,
    )


DEVICE = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_tensorrt_10_is_strongly_typed_without_precision_flags(precision):
    plan = plan_build(_meta(precision), "10.13.3.9")
    assert plan.major == 10
    assert plan.network_flags == ["STRONGLY_TYPED"]
    assert "EXPLICIT_BATCH" not in plan.network_flags
    assert not {"FP16", "INT8", "BF16", "FP8"} & set(plan.builder_flags)
    assert plan.clear_flags == (["TF32"] if precision == "fp32" else [])
    assert plan.profiles[0].min == [1, 3, 32, 32] and plan.profiles[0].opt == [8, 3, 32, 32]
    assert plan.profiles[0].max == [32, 3, 32, 32]


@pytest.mark.parametrize("version", ["11.0.0", "11.4.1.3"])
def test_plan_tensorrt_11_has_no_typing_or_precision_flags(version):
    plan = plan_build(_meta("int8"), version, batch="2,4,16", workspace_gb=2)
    assert plan.major == 11 and plan.network_flags == []
    assert not {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"} & set(plan.builder_flags)
    assert (plan.profiles[0].min[0], plan.profiles[0].opt[0], plan.profiles[0].max[0]) == (2, 4, 16)
    assert plan.workspace_bytes == 2 << 30


def test_plan_refuses_old_tensorrt():
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6.1 is too old"):
        plan_build(_meta(), "8.6.1")


def test_plan_refit_version_and_hardware_options():
    plan = plan_build(_meta(separable=True), "10.9.0", refit=True)
    assert plan.builder_flags == ["REFIT_INDIVIDUAL"]
    assert plan.refittable_weights == ["blocks.0.adapter.down.weight", "head.weight"]
    with pytest.raises(BadInputError, match="--separable"):
        plan_build(_meta(), "10.9.0", refit=True)
    with pytest.raises(BadInputError, match="lean runtime"):
        plan_build(_meta(separable=True), "11.1.0", refit=True, version_compatible=True)
    vc = plan_build(_meta(), "11.1.0", version_compatible=True, hardware_compatible=True, device_cc=(8, 6))
    assert "VERSION_COMPATIBLE" in vc.builder_flags and vc.engine_host_code_allowed
    assert vc.hardware_compatibility == "AMPERE_PLUS"
    with pytest.raises(BadInputError, match="Ampere"):
        plan_build(_meta(), "10.9.0", hardware_compatible=True, device_cc=(7, 5))


def test_plan_batch_ranges():
    assert parse_batch_range("1,8,32") == (1, 8, 32)
    assert parse_batch_range("4") == (4, 4, 4)
    with pytest.raises(BadInputError):
        parse_batch_range("8,1,32")
    fixed = plan_build(_meta(batch=4), "10.9.0")
    assert fixed.profiles[0].min == fixed.profiles[0].max == [4, 3, 32, 32]
    with pytest.raises(BadInputError, match="fixed batch of 4"):
        plan_build(_meta(batch=4), "10.9.0", batch="1,8,32")


def _sidecar(plan, device=DEVICE):
    return engine_sidecar(_meta(plan.precision), plan, device=device, engine_path="/x/model.fp16.engine",
                          engine_sha256="0" * 64, engine_bytes=123, onnx_path="/x/model.fp16.onnx", onnx_sha256="1" * 64)


def test_sidecar_holds_metadata_and_build_facts():
    plan = plan_build(_meta("fp16"), "10.13.3.9", timing_cache="/x/t.cache")
    side = json.loads(json.dumps(_sidecar(plan)))  # JSON-able
    assert side["metadata"]["preprocess"]["input_size"] == [3, 32, 32]
    assert side["metadata"]["class_names"][0] == "c0"
    assert side["tensorrt"] == {"version": "10.13.3.9", "major": 10}
    assert side["device"]["compute_capability"] == [9, 0] and side["device"]["sm"] == "sm_90"
    assert side["precision"] == "fp16" and side["profiles"][0]["max"][0] == 32
    assert BuildPlan.from_dict(side["build"]).network_flags == ["STRONGLY_TYPED"]


def test_engine_for_another_gpu_or_version_is_refused_with_rebuild_command():
    side = _sidecar(plan_build(_meta("int8"), "10.13.3.9"))
    assert check_compatible(side, "10.13.3.9", DEVICE) == []
    with pytest.raises(IncompatibleCheckpointError) as e:
        check_compatible(side, "10.13.3.9", {"name": "Orin", "compute_capability": [8, 7]})
    msg = str(e.value)
    assert "compute capability 9.0" in msg and "8.7" in msg
    assert "atexport trt --onnx /x/model.fp16.onnx --precision int8 --batch 1,8,32" in msg
    with pytest.raises(IncompatibleCheckpointError, match=r"TensorRT 10.13.3.9 \(this machine has 11.0.0\)"):
        check_compatible(side, "11.0.0", DEVICE)
    # version compatible: later runtimes are fine, earlier are not; hardware compatible: any Ampere+
    vc = _sidecar(plan_build(_meta("fp16"), "10.13.0", version_compatible=True, hardware_compatible=True))
    assert check_compatible(vc, "11.1.0", {"name": "A10", "compute_capability": [8, 6]}) == []
    with pytest.raises(IncompatibleCheckpointError, match="or newer"):
        check_compatible(vc, "10.9.0", DEVICE)
    assert "--version-compatible" in rebuild_command(vc) and "--hardware-compatible" in rebuild_command(vc)
    # same compute capability, other GPU model: a warning, not a refusal
    warns = check_compatible(side, "10.13.3.9", {"name": "NVIDIA H800", "compute_capability": [9, 0]})
    assert warns and "rebuild for best speed" in warns[0]


def test_trt_without_tensorrt_writes_precision_onnx_then_stops(tmp_path, tiny_ckpt, monkeypatch):
    import atexport.export.tensorrt as trt_mod
    from atexport.cli import cli
    from atexport.export.onnx import export_onnx

    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: None)
    fp32 = export_onnx(tiny_ckpt, tmp_path / "m.onnx", verify=False).path
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(fp32), "--precision", "int8", "--calib", "digits",
                                 "--calib-count", "64"])
    assert r.exit_code == MissingDependencyError.exit_code, r.output
    assert "TensorRT is not installed here" in r.output
    assert f"atexport trt --onnx {tmp_path / 'm.int8.onnx'} --precision int8" in r.output
    meta_props = {p.key for p in onnx.load(str(tmp_path / "m.int8.onnx")).metadata_props}
    assert "atexport" in meta_props
    # --build auto: the same stop, with the same sentence, but a success (pipelines go on to verify)
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(fp32), "--precision", "fp16", "--build", "auto"])
    assert r.exit_code == 0, r.output
    assert "TensorRT is not installed here" in r.output and (tmp_path / "m.fp16.onnx").is_file()
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(fp32), "--precision", "fp16", "--build", "no",
                                 "--onnx-out", str(tmp_path / "n.fp16.onnx")])
    assert r.exit_code == 0 and "--build no" in r.output and (tmp_path / "n.fp16.onnx").is_file()
    # no calibration set: refused before any work
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(fp32), "--precision", "int8"])
    assert r.exit_code == BadInputError.exit_code and "--calib" in r.output


def test_trt_without_gpu_says_so(tmp_path, tiny_ckpt, monkeypatch):
    import atexport.export.tensorrt as trt_mod
    from atexport.export.onnx import export_onnx

    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: "10.13.3.9")

    def no_gpu(index=0):
        raise MissingDependencyError("no CUDA GPU")

    monkeypatch.setattr(trt_mod, "cuda_device", no_gpu)
    fp32 = export_onnx(tiny_ckpt, tmp_path / "m.onnx", verify=False).path
    with pytest.raises(MissingDependencyError, match="no CUDA GPU is visible here, so no engine was built"):
        trt_mod.export_tensorrt(fp32, precision="fp16", verify=False)
    assert (tmp_path / "m.fp16.onnx").is_file()


# ------------------------------------------------------------- with TensorRT and a GPU (skipped here)


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_engine_and_parity(tmp_path, tiny_ckpt, precision):
    from atexport.export.tensorrt import export_tensorrt
    from atexport.runtime.tensorrt import TensorRTRunner

    res = export_tensorrt(ckpt=tiny_ckpt, precision=precision, calib="digits" if precision == "int8" else None,
                          output=tmp_path / f"m.{precision}.engine", batch="1,4,8")
    assert res.engine is not None and res.engine.path.is_file()
    assert res.parity and all(r.passed for r in res.parity)
    side = json.loads(res.engine.sidecar_path.read_text())
    assert side["precision"] == precision and side["device"]["compute_capability"]
    with TensorRTRunner(res.engine.path) as r:
        assert r.infer(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 5)


@pytest.mark.tensorrt
def test_refit_engine_swaps_task(tmp_path, tiny_ckpt, tiny_ckpt_b):
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.export.tensorrt import export_tensorrt, refit_engine
    from atexport.runtime.tensorrt import TensorRTRunner
    from atexport.runtime.torch import TorchRunner
    from atexport.verify.parity import check_parity, photo_batch

    res = export_tensorrt(ckpt=tiny_ckpt, precision="fp16", refit=True, output=tmp_path / "a.engine", batch="1,4,8")
    out = refit_engine(res.engine.path, tiny_ckpt_b, tmp_path / "b.engine")
    assert out.refitted == len(res.plan.refittable_weights)
    meta = res.engine.sidecar["metadata"]
    x = photo_batch(meta["preprocess"])
    with TorchRunner(build_model(load_checkpoint(tiny_ckpt_b))) as ref, TensorRTRunner(out.path) as cand:
        rows = check_parity(ref, cand, x, "fp16", random_inputs=0, batch_sizes=[4])
    assert all(r.passed for r in rows)


@pytest.mark.tensorrt
def test_refit_refuses_misfit(tmp_path, tiny_ckpt, tiny_ckpt_every2):
    from atexport.export.tensorrt import export_tensorrt, refit_engine

    res = export_tensorrt(ckpt=tiny_ckpt, precision="fp16", refit=True, output=tmp_path / "a.engine", batch="1,4,8")
    with pytest.raises(IncompatibleCheckpointError):
        refit_engine(res.engine.path, tiny_ckpt_every2, tmp_path / "c.engine")


# ------------------------------------------------------------- multi-task models (planning here, engines on TensorRT)


@pytest.fixture(scope="module")
def mt_trt(tmp_path_factory):
    """A two-task model (3 and 5 classes) from tiny checkpoints, a new version of task0 and a too-wide head."""
    from test_multitask import _backbone_file, _task_ckpt

    from atexport.export.multitask import export_multitask

    d = tmp_path_factory.mktemp("mt_trt")
    bb = _backbone_file(d / "backbone.pt")
    ckpts = [_task_ckpt(d / f"task{i}.pt", bb, c, weight_seed=30 + i) for i, c in enumerate((3, 5))]
    res = export_multitask(ckpts, d / "tasks.onnx", verify=False)
    return SimpleNamespace(dir=d, path=res.path, meta=res.metadata, ckpts=ckpts,
                           v2=_task_ckpt(d / "task0_v2.pt", bb, 3, weight_seed=40),
                           wide=_task_ckpt(d / "wide.pt", bb, 9, weight_seed=41))


def _mt_meta(path):
    from atexport.metadata import read_onnx_metadata

    return read_onnx_metadata(onnx.load(str(path)), str(path))


@pytest.mark.parametrize("version", ["10.13.3.9", "11.1.0"])
def test_plan_multitask_profiles_every_batch_input(mt_trt, version):
    from atexport.export.trt_plan import batch_inputs, describe_plan

    meta = _mt_meta(mt_trt.path)
    assert batch_inputs(meta) == [("input", [3, 32, 32]), ("task_id", [])]
    plan = plan_build(meta, version, batch="1,4,8", refit=True)
    assert [(p.input, p.min, p.opt, p.max) for p in plan.profiles] == [
        ("input", [1, 3, 32, 32], [4, 3, 32, 32], [8, 3, 32, 32]), ("task_id", [1], [4], [8])]
    assert plan.builder_flags == ["REFIT_INDIVIDUAL"]
    assert plan.refittable_weights == list(meta.manifest) and all(n.startswith("bank.") for n in plan.refittable_weights)
    assert "task_id min [1] opt [4] max [8]" in describe_plan(plan)
    side = json.loads(json.dumps(_sidecar_for(meta, plan, mt_trt.path)))
    assert [t["name"] for t in side["metadata"]["tasks"]] == ["task0", "task1"]
    assert side["metadata"]["extra"]["task_input"]["dtype"] == "int64"
    assert side["metadata"]["extra"]["multitask"]["max_classes"] == 5
    assert [p["input"] for p in side["profiles"]] == ["input", "task_id"]
    # fixed batch: both inputs get it
    fixed = _meta(batch=4)
    fixed.tasks, fixed.extra = [{"name": "a", "index": 0, "num_classes": 5}], {"task_input": {"name": "task_id", "shape": [4]}}
    assert [(p.input, p.min, p.max) for p in plan_build(fixed, version).profiles] == [
        ("input", [4, 3, 32, 32], [4, 3, 32, 32]), ("task_id", [4], [4])]


def _sidecar_for(meta, plan, onnx_path, engine_path="/x/tasks.engine", engine_sha="0" * 64):
    from atexport.utils.io import sha256_file

    return engine_sidecar(meta, plan, device=DEVICE, engine_path=engine_path, engine_sha256=engine_sha,
                          engine_bytes=12, onnx_path=onnx_path, onnx_sha256=sha256_file(onnx_path))


def test_refit_banks_replace_exactly_one_task_slice(mt_trt, tmp_path):
    from atexport.checkpoint import load_checkpoint
    from atexport.export.multitask import add_task, read_banks, refit_banks, task_slices

    meta = _mt_meta(mt_trt.path)
    banks = read_banks(mt_trt.path, meta)
    v2 = load_checkpoint(mt_trt.v2)
    new, tasks = refit_banks(meta, banks, v2, "task0")
    want = task_slices(meta.manifest, v2.state_dict)
    for name, a in new.items():
        assert a.shape == banks[name].shape and a.dtype == np.float32
        np.testing.assert_array_equal(a[0], want[name])
        np.testing.assert_array_equal(a[1], banks[name][1])  # the other task untouched
    assert any(not np.array_equal(new[n][0], banks[n][0]) for n in new)
    assert tasks[0]["name"] == "task0" and tasks[0]["index"] == 0 and tasks[0]["source"] == "task0_v2.pt"
    assert tasks[0]["fingerprint"] != meta.tasks[0]["fingerprint"] and tasks[1] == meta.tasks[1]
    # the same bank as replacing the task in the ONNX model ('atexport tasks add --replace')
    onnx_banks = read_banks(add_task(mt_trt.path, v2, tmp_path / "r.onnx", name="task0", replace=True).path, meta)
    for name in new:
        np.testing.assert_array_equal(new[name], onnx_banks[name])


def test_refit_banks_refusals(mt_trt):
    import dataclasses

    from atexport.checkpoint import load_checkpoint
    from atexport.export.multitask import read_banks, refit_banks

    meta = _mt_meta(mt_trt.path)
    banks = read_banks(mt_trt.path, meta)
    v2 = load_checkpoint(mt_trt.v2)
    with pytest.raises(BadInputError, match=r"no task 'task0_v2' \(its tasks: task0, task1\).*atexport tasks add"):
        refit_banks(meta, banks, v2)  # default name: the file stem, not a task of the model
    with pytest.raises(IncompatibleCheckpointError, match="9 classes > the model's capacity of 5"):
        refit_banks(meta, banks, load_checkpoint(mt_trt.wide), "task1")
    with pytest.raises(BadInputError, match="INT8"):
        refit_banks(dataclasses.replace(meta, precision="int8"), banks, v2, "task0")


def test_refit_engine_multitask_checks_run_before_tensorrt(mt_trt, tmp_path, monkeypatch):
    """refit_engine's own checks on a multi-task engine (real code up to the TensorRT import)."""
    import hashlib
    import importlib.util

    from atexport.export.multitask import read_banks
    from atexport.export.tensorrt import refit_engine
    from atexport.export.trt_plan import bank_path, bank_source

    meta = _mt_meta(mt_trt.path)
    engine = tmp_path / "tasks.engine"
    engine.write_bytes(b"a multi-task engine")
    side = _sidecar_for(meta, plan_build(meta, "10.13.3.9", refit=True), mt_trt.path, engine,
                        hashlib.sha256(engine.read_bytes()).hexdigest())
    (tmp_path / "tasks.engine.json").write_text(json.dumps(side))
    assert bank_source(side, engine) == mt_trt.path
    with pytest.raises(BadInputError, match="no task 'nope'"):
        refit_engine(engine, mt_trt.v2, task_name="nope")
    with pytest.raises(IncompatibleCheckpointError, match="capacity of 5"):
        refit_engine(engine, mt_trt.wide, task_name="task1")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(MissingDependencyError, match="TensorRT's Python package is not installed"):
            refit_engine(engine, mt_trt.v2, task_name="task0")
        assert not bank_path(engine).exists() and engine.read_bytes() == b"a multi-task engine"
    # the bank comes from a previous refit's bank file when the sidecar names one, checked by sha256
    banks = read_banks(mt_trt.path, meta)
    np.savez(bank_path(engine), **banks)
    from atexport.utils.io import sha256_file

    side_b = {**side, "bank": {"path": bank_path(engine).name, "sha256": sha256_file(bank_path(engine))}}
    assert bank_source(side_b, engine) == bank_path(engine)
    assert set(read_banks(bank_path(engine), meta)) == set(banks)
    with pytest.raises(BadInputError, match="changed since the refit wrote it"):
        bank_source({**side_b, "bank": {**side_b["bank"], "sha256": "0" * 64}}, engine)
    with pytest.raises(BadInputError, match=r"changed since \(sha256 differs"):
        bank_source({**side, "onnx": {**side["onnx"], "sha256": "0" * 64}}, engine)
    with pytest.raises(BadInputError, match="which is not there"):
        bank_source({**side, "onnx": {"path": str(tmp_path / "gone.onnx")}}, engine)


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_multitask_engine_mixed_batch_and_task_refit(mt_trt, tmp_path, precision):
    from atexport.export.multitask import add_task, run_mixed
    from atexport.export.tensorrt import export_tensorrt, refit_engine
    from atexport.runtime import load_model
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.tensorrt import TensorRTRunner

    res = export_tensorrt(mt_trt.path, precision=precision, refit=True, output=tmp_path / "tasks.engine",
                          batch="1,4,8")
    assert res.parity and all(r.passed for r in res.parity) and {"task_id"} <= {p.input for p in res.plan.profiles}
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    ids = np.array([0, 1, 1, 0, 1, 0, 0], dtype=np.int64)
    tol = 1e-4 if precision == "fp32" else 5e-2
    with OnnxRuntimeRunner(str(mt_trt.path)) as ref, TensorRTRunner(res.engine.path) as cand:
        np.testing.assert_allclose(run_mixed(cand, x, ids, 4), run_mixed(ref, x, ids, 4), atol=tol, rtol=tol)
    out = refit_engine(res.engine.path, mt_trt.v2, tmp_path / "v2.engine", task_name="task0")
    assert out.sidecar["bank"]["path"] == "v2.engine.bank.npz" and out.refitted == len(mt_trt.meta.manifest)
    replaced = add_task(mt_trt.path, mt_trt.v2, tmp_path / "v2.onnx", name="task0", replace=True).path
    with OnnxRuntimeRunner(str(replaced)) as ref, TensorRTRunner(out.path) as cand:
        np.testing.assert_allclose(run_mixed(cand, x, ids, 4), run_mixed(ref, x, ids, 4), atol=tol, rtol=tol)
    # a second refit starts from the first one's bank (task0 stays v2)
    again = refit_engine(out.path, mt_trt.ckpts[1], tmp_path / "again.engine", task_name="task1")
    with OnnxRuntimeRunner(str(replaced)) as ref, TensorRTRunner(again.path) as cand:
        np.testing.assert_allclose(run_mixed(cand, x, ids, 4), run_mixed(ref, x, ids, 4), atol=tol, rtol=tol)
    m = load_model(again.path)
    assert m.mode == "multitask" and [p.task for p in m.predict(x[:2], task=["task0", "task1"])] == ["task0", "task1"]
