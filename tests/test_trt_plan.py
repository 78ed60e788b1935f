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
from atexport.artifact.sidecar import check_engine_compatible as check_compatible
from atexport.artifact.sidecar import rebuild_command
from atexport.export.tensorrt.plan import BuildPlan, EngineOptions, engine_sidecar, parse_batch_range, plan_build
from atexport.artifact.metadata import ModelMetadata


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
    plan = plan_build(_meta("int8"), version, EngineOptions(batch="2,4,16", workspace_gb=2))
    assert plan.major == 11 and plan.network_flags == []
    assert not {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"} & set(plan.builder_flags)
    assert (plan.profiles[0].min[0], plan.profiles[0].opt[0], plan.profiles[0].max[0]) == (2, 4, 16)
    assert plan.workspace_bytes == 2 << 30


def test_plan_refuses_old_tensorrt():
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6.1 is too old"):
        plan_build(_meta(), "8.6.1")


def test_plan_refit_version_and_hardware_options():
    plan = plan_build(_meta(separable=True), "10.9.0", EngineOptions(refit=True))
    assert plan.builder_flags == ["REFIT_INDIVIDUAL"]
    assert plan.refittable_weights == ["blocks.0.adapter.down.weight", "head.weight"]
    with pytest.raises(BadInputError, match="--separable"):
        plan_build(_meta(), "10.9.0", EngineOptions(refit=True))
    with pytest.raises(BadInputError, match="lean runtime"):
        plan_build(_meta(separable=True), "11.1.0", EngineOptions(refit=True, version_compatible=True))
    vc = plan_build(_meta(), "11.1.0", EngineOptions(version_compatible=True, hardware_compatible=True), device_cc=(8, 6))
    assert "VERSION_COMPATIBLE" in vc.builder_flags and vc.engine_host_code_allowed
    assert vc.hardware_compatibility == "AMPERE_PLUS"
    with pytest.raises(BadInputError, match="Ampere"):
        plan_build(_meta(), "10.9.0", EngineOptions(hardware_compatible=True), device_cc=(7, 5))


def test_plan_batch_ranges():
    assert parse_batch_range("1,8,32") == (1, 8, 32)
    assert parse_batch_range("4") == (4, 4, 4)
    with pytest.raises(BadInputError):
        parse_batch_range("8,1,32")
    fixed = plan_build(_meta(batch=4), "10.9.0")
    assert fixed.profiles[0].min == fixed.profiles[0].max == [4, 3, 32, 32]
    with pytest.raises(BadInputError, match="fixed batch of 4"):
        plan_build(_meta(batch=4), "10.9.0", EngineOptions(batch="1,8,32"))


def _sidecar(plan, device=DEVICE):
    return engine_sidecar(_meta(plan.precision), plan, device=device, engine_path="/x/model.fp16.engine",
                          engine_sha256="0" * 64, engine_bytes=123, onnx_path="/x/model.fp16.onnx", onnx_sha256="1" * 64)


def test_sidecar_holds_metadata_and_build_facts():
    plan = plan_build(_meta("fp16"), "10.13.3.9", EngineOptions(timing_cache="/x/t.cache"))
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
    vc = _sidecar(plan_build(_meta("fp16"), "10.13.0", EngineOptions(version_compatible=True, hardware_compatible=True)))
    assert check_compatible(vc, "11.1.0", {"name": "A10", "compute_capability": [8, 6]}) == []
    with pytest.raises(IncompatibleCheckpointError, match="or newer"):
        check_compatible(vc, "10.9.0", DEVICE)
    assert "--version-compatible" in rebuild_command(vc) and "--hardware-compatible" in rebuild_command(vc)
    # same compute capability, other GPU model: a warning, not a refusal
    warns = check_compatible(side, "10.13.3.9", {"name": "NVIDIA H800", "compute_capability": [9, 0]})
    assert warns and "rebuild for best speed" in warns[0]


def test_trt_without_tensorrt_writes_precision_onnx_then_stops(tmp_path, tiny_ckpt, monkeypatch):
    import atexport.export.tensorrt.stage as trt_mod
    from atexport.cli import cli
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: None)
    fp32 = export_onnx(tiny_ckpt, tmp_path / "m.onnx", ExportSettings(verify=False)).path
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
    import atexport.export.tensorrt.stage as trt_mod
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: "10.13.3.9")

    def no_gpu(index=0):
        raise MissingDependencyError("no CUDA GPU")

    monkeypatch.setattr(trt_mod, "cuda_device", no_gpu)
    fp32 = export_onnx(tiny_ckpt, tmp_path / "m.onnx", ExportSettings(verify=False)).path
    with pytest.raises(MissingDependencyError, match=r"no CUDA GPU is visible here \(no CUDA GPU\), so no engine was built"):
        trt_mod.export_tensorrt(fp32, precision="fp16", verify=False)
    assert (tmp_path / "m.fp16.onnx").is_file()


# ------------------------------------------------------------- with TensorRT and a GPU (skipped here)


def run_mixed(runner, x, ids, batch):
    """Logits of a multi-task runner over ``x`` in chunks of ``batch``, each sample with its task id."""
    return np.concatenate([runner.infer(x[i:i + batch], task_id=ids[i:i + batch]) for i in range(0, len(x), batch)])


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_engine_and_parity(tmp_path, tiny_ckpt, precision):
    from atexport.export.tensorrt import export_tensorrt
    from atexport.runtime.tensorrt import TensorRTRunner

    from atexport.export.tensorrt import EngineOptions, Int8Options

    res = export_tensorrt(ckpt=tiny_ckpt, precision=precision,
                          int8=Int8Options(calib="digits") if precision == "int8" else None,
                          engine=EngineOptions(batch="1,4,8", output=tmp_path / f"m.{precision}.engine"))
    assert res.engine is not None and res.engine.path.is_file()
    assert res.parity and all(r.passed for r in res.parity)
    side = json.loads(res.engine.sidecar_path.read_text())
    assert side["precision"] == precision and side["device"]["compute_capability"]
    with TensorRTRunner(res.engine.path) as r:
        assert r.infer(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 5)


@pytest.mark.tensorrt
def test_refit_engine_swaps_task(tmp_path, tiny_ckpt, tiny_ckpt_b):
    from atexport.export.tensorrt import EngineOptions

    from atexport.artifact.sidecar import rebuild_command
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.export.tensorrt import export_tensorrt, refit_engine
    from atexport.runtime.tensorrt import TensorRTRunner
    from atexport.runtime.torch import TorchRunner
    from atexport.parity import ParitySettings, check_parity, photo_batch

    res = export_tensorrt(ckpt=tiny_ckpt, precision="fp16",
                          engine=EngineOptions(refit=True, batch="1,4,8", output=tmp_path / "a.engine"))
    out = refit_engine(res.engine.path, tiny_ckpt_b, tmp_path / "b.engine")
    assert out.refitted == len(res.plan.refittable_weights)
    assert out.parity and all(r.passed for r in out.parity)  # checked against the swapped ONNX model in ORT
    assert out.onnx_path == tmp_path / "b.engine.onnx" and str(out.onnx_path.resolve()) in rebuild_command(out.sidecar)
    assert out.sidecar["metadata"]["task"] == "tiny_b" and out.sidecar["task"]["fingerprint"]
    meta = res.engine.sidecar["metadata"]
    x = photo_batch(meta["preprocess"])
    with TorchRunner(build_model(load_checkpoint(tiny_ckpt_b))) as ref, TensorRTRunner(out.path) as cand:
        rows = check_parity(ref, cand, x, "fp16", settings=ParitySettings(random_inputs=0, batch_sizes=[4]))
    assert all(r.passed for r in rows)


@pytest.mark.tensorrt
def test_refit_refuses_misfit(tmp_path, tiny_ckpt, tiny_ckpt_every2):
    from atexport.export.tensorrt import EngineOptions, export_tensorrt, refit_engine

    res = export_tensorrt(ckpt=tiny_ckpt, precision="fp16",
                          engine=EngineOptions(refit=True, batch="1,4,8", output=tmp_path / "a.engine"))
    with pytest.raises(IncompatibleCheckpointError):
        refit_engine(res.engine.path, tiny_ckpt_every2, tmp_path / "c.engine")


# ------------------------------------------------------------- multi-task models (planning here, engines on TensorRT)


@pytest.fixture(scope="module")
def mt_trt(tmp_path_factory):
    """A two-task model (3 and 5 classes) from tiny checkpoints, a new version of task0 and a too-wide head."""
    from test_multitask import _backbone_file, _task_ckpt

    from atexport.export.multitask import export_multitask
    from atexport.export.settings import ExportSettings

    d = tmp_path_factory.mktemp("mt_trt")
    bb = _backbone_file(d / "backbone.pt")
    ckpts = [_task_ckpt(d / f"task{i}.pt", bb, c, weight_seed=30 + i) for i, c in enumerate((3, 5))]
    res = export_multitask(ckpts, d / "tasks.onnx", ExportSettings(verify=False))
    return SimpleNamespace(dir=d, path=res.path, meta=res.metadata, ckpts=ckpts,
                           v2=_task_ckpt(d / "task0_v2.pt", bb, 3, weight_seed=40),
                           wide=_task_ckpt(d / "wide.pt", bb, 9, weight_seed=41))


def _mt_meta(path):
    from atexport.artifact.metadata import read_onnx_metadata

    return read_onnx_metadata(onnx.load(str(path)), str(path))


@pytest.mark.parametrize("version", ["10.13.3.9", "11.1.0"])
def test_plan_multitask_profiles_every_batch_input(mt_trt, version):
    from atexport.export.tensorrt.plan import batch_inputs, describe_plan

    meta = _mt_meta(mt_trt.path)
    assert batch_inputs(meta) == [("input", [3, 32, 32]), ("task_id", [])]
    plan = plan_build(meta, version, EngineOptions(batch="1,4,8", refit=True))
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
    from atexport.artifact.bank import task_slices
    from atexport.export.multitask import add_task, read_banks, refit_banks

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
    from atexport.artifact.sidecar import bank_path, bank_source

    meta = _mt_meta(mt_trt.path)
    engine = tmp_path / "tasks.engine"
    engine.write_bytes(b"a multi-task engine")
    side = _sidecar_for(meta, plan_build(meta, "10.13.3.9", EngineOptions(refit=True)), mt_trt.path, engine,
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
    from atexport.export.multitask import add_task
    from atexport.runtime.batching import run_batched
    from atexport.export.tensorrt import export_tensorrt, refit_engine
    from atexport.runtime import load_model
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.tensorrt import TensorRTRunner

    res = export_tensorrt(mt_trt.path, precision=precision,
                          engine=EngineOptions(refit=True, batch="1,4,8", output=tmp_path / "tasks.engine"))
    assert res.parity and all(r.passed for r in res.parity) and {"task_id"} <= {p.input for p in res.plan.profiles}
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    ids = np.array([0, 1, 1, 0, 1, 0, 0], dtype=np.int64)
    tol = 1e-4 if precision == "fp32" else 5e-2
    with OnnxRuntimeRunner(str(mt_trt.path)) as ref, TensorRTRunner(res.engine.path) as cand:
        np.testing.assert_allclose(run_batched(cand, x, 4, per_sample={"task_id": ids}),
                                   run_batched(ref, x, 4, per_sample={"task_id": ids}), atol=tol, rtol=tol)
    out = refit_engine(res.engine.path, mt_trt.v2, tmp_path / "v2.engine", task_name="task0")
    assert out.sidecar["bank"]["path"] == "v2.engine.bank.npz" and out.refitted == len(mt_trt.meta.manifest)
    replaced = add_task(mt_trt.path, mt_trt.v2, tmp_path / "v2.onnx", name="task0", replace=True).path
    with OnnxRuntimeRunner(str(replaced)) as ref, TensorRTRunner(out.path) as cand:
        np.testing.assert_allclose(run_batched(cand, x, 4, per_sample={"task_id": ids}),
                                   run_batched(ref, x, 4, per_sample={"task_id": ids}), atol=tol, rtol=tol)
    # a second refit starts from the first one's bank (task0 stays v2)
    again = refit_engine(out.path, mt_trt.ckpts[1], tmp_path / "again.engine", task_name="task1")
    with OnnxRuntimeRunner(str(replaced)) as ref, TensorRTRunner(again.path) as cand:
        np.testing.assert_allclose(run_batched(cand, x, 4, per_sample={"task_id": ids}),
                                   run_batched(ref, x, 4, per_sample={"task_id": ids}), atol=tol, rtol=tol)
    m = load_model(again.path)
    assert m.mode == "multitask" and [p.task for p in m.predict(x[:2], task=["task0", "task1"])] == ["task0", "task1"]


# ------------------------------------------------------------- options, refusals, version and platform rules (issue 12)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch": "a,b"}, "expected MIN,OPT,MAX"),
    ({"batch": "0,-1,x"}, "expected MIN,OPT,MAX"),
    ({"batch": "8,1,32"}, "need 1 <= min <= opt <= max"),
    ({"batch": "0"}, "need 1 <= min"),
    ({"workspace_gb": -1}, "positive number of GiB"),
    ({"workspace_gb": float("nan")}, "positive number of GiB"),
    ({"optimization_level": 7}, "0-5"),
    ({"hardware_compatible": "turing_plus"}, "expected one of"),
    ({"refit": True, "version_compatible": True}, "lean runtime"),
])
def test_engine_options_validated_on_construction(kwargs, match):
    with pytest.raises(BadInputError, match=match):
        EngineOptions(**kwargs)


@pytest.mark.parametrize("args, match", [
    (["--batch", "8,1,32", "--build", "no"], "need 1 <= min <= opt <= max"),
    (["--batch", "a,b", "--build", "auto"], "expected MIN,OPT,MAX"),
    (["--workspace", "-1", "--build", "no"], "positive number of GiB"),
    (["--batch", "1,4,8", "--build", "no"], "--batch applies to the engine build; --build no"),
    (["--calib", "digits"], "--calib applies to --precision int8, not fp16"),
    (["--target", "cpu", "--int8-keep-float", "head"], "--int8-keep-float, --target apply to --precision int8"),
    (["--no-verify", "--images", "."], "--images adds photos to the parity check"),
])
def test_trt_flags_checked_before_any_work(tmp_path, args, match):
    """Every flag is validated (and refused where it does not apply) before the precision model is made."""
    from atexport.cli import cli

    fp32 = tmp_path / "never_read.onnx"
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(fp32), "--precision", "fp16", *args])
    assert r.exit_code == BadInputError.exit_code, r.output
    assert match in r.output and "Traceback" not in r.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_trt_refuses_engine_flags_for_cpu_int8_and_calib_for_ready_models(tmp_path, tiny_ckpt):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.export.tensorrt import Int8Options, export_tensorrt

    fp32 = export_onnx(tiny_ckpt, tmp_path / "m.onnx", ExportSettings(verify=False)).path
    with pytest.raises(BadInputError, match="--batch, -o apply to a TensorRT engine; --target cpu"):
        export_tensorrt(fp32, precision="int8", int8=Int8Options(calib="digits", target="cpu"),
                        engine=EngineOptions(batch="1,2,4", output=tmp_path / "x.engine"))
    with pytest.raises(BadInputError, match="--refit needs a model exported with 'atexport onnx --separable'"):
        export_tensorrt(fp32, precision="fp16", engine=EngineOptions(refit=True, build="no"))
    with pytest.raises(BadInputError, match="--calib applies to --precision int8, not fp32"):
        export_tensorrt(fp32, precision="fp32", int8=Int8Options(calib="digits"))
    with pytest.raises(BadInputError, match="--onnx-out applies to converting a model; .* is already fp32"):
        export_tensorrt(fp32, precision="fp32", precision_output=tmp_path / "y.onnx", engine=EngineOptions(build="no"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_trt_ckpt_of_another_backbone_is_refused_first(tmp_path, tiny_ckpt):
    """--onnx with the --ckpt of another backbone: exit 3 naming both fingerprints, before any conversion."""
    from _helpers import make_checkpoint

    from atexport.cli import cli
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    fp32 = export_onnx(tiny_ckpt, tmp_path / "m.onnx", ExportSettings(verify=False)).path
    other = make_checkpoint(tmp_path / "other.pt", seed=7)
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(fp32), "--ckpt", str(other), "--precision", "fp16",
                                 "--build", "no"])
    assert r.exit_code == IncompatibleCheckpointError.exit_code, r.output
    assert "fingerprint" in r.output and "not the checkpoint" in r.output
    assert not (tmp_path / "m.fp16.onnx").exists()


@pytest.mark.parametrize("version, flag", [("10.0.1", "REFIT"), ("10.1.0", "REFIT"), ("10.2.0", "REFIT_INDIVIDUAL"),
                                           ("11.1.0", "REFIT_INDIVIDUAL")])
def test_refit_flag_per_tensorrt_version(version, flag):
    plan = plan_build(_meta(separable=True), version, EngineOptions(refit=True))
    assert plan.builder_flags == [flag]
    assert plan.refittable_weights == ["blocks.0.adapter.down.weight", "head.weight"]
    if flag == "REFIT":
        assert any("no REFIT_INDIVIDUAL" in n and "10.2" in n for n in plan.notes)


def _qdq_model():
    """A tiny INT8 graph: head.weight feeds a MatMul whose activation is dequantized; adapter.w feeds a float MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    f = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("MatMul", ["xd", "head.weight"], ["y"], name="head"),
        helper.make_node("Transpose", ["adapter.w"], ["wt"], name="t"),
        helper.make_node("MatMul", ["x", "wt"], ["a"], name="adapter"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(f, "head.weight"), numpy_helper.from_array(f, "adapter.w"),
         numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    return helper.make_model(graph)


def test_int8_refit_refused_when_swapped_tensors_feed_quantized_layers():
    from atexport.export.tensorrt.plan import quantized_consumers

    hits = quantized_consumers(_qdq_model(), ["head.weight", "adapter.w"])
    assert hits == {"head.weight": ["head"]}  # the float adapter layer (kept float) is fine
    with pytest.raises(BadInputError, match=r"feed quantized layers \(head.weight -> head\).*--int8-keep-float"):
        plan_build(_meta("int8", separable=True), "10.13.3.9", EngineOptions(refit=True), quantized=hits)
    ok = plan_build(_meta("int8", separable=True), "10.13.3.9", EngineOptions(refit=True), quantized={})
    assert ok.int8_refit_checked and ok.builder_flags == ["REFIT_INDIVIDUAL"]


@pytest.mark.parametrize("version, level, jetson, match", [
    ("10.8.0", "same_compute_capability", False, "needs TensorRT 10.9 or newer"),
    ("10.3.0", "ampere_plus", True, "no hardware compatibility on Jetson"),
    ("10.9.0", "same_compute_capability", True, "no hardware compatibility on Jetson"),
])
def test_hardware_compatibility_per_version_and_platform(version, level, jetson, match):
    with pytest.raises(BadInputError, match=match):
        plan_build(_meta(), version, EngineOptions(hardware_compatible=level), jetson=jetson)


def test_hardware_compatibility_allowed():
    assert plan_build(_meta(), "10.9.0", EngineOptions(hardware_compatible="same_compute_capability"),
                      device_cc=(8, 9)).hardware_compatibility == "SAME_COMPUTE_CAPABILITY"
    assert plan_build(_meta(), "10.3.0", EngineOptions(hardware_compatible=True),
                      device_cc=(8, 7)).hardware_compatibility == "AMPERE_PLUS"


def test_default_timing_cache_is_keyed_by_version_cc_and_gpu_name():
    from atexport.export.tensorrt.plan import default_timing_cache

    a10 = default_timing_cache("/x/m.engine", "10.13.3.9", {"name": "NVIDIA A10", "compute_capability": [8, 6]})
    a40 = default_timing_cache("/x/m.engine", "10.13.3.9", {"name": "NVIDIA A40", "compute_capability": [8, 6]})
    assert a10.name == ".atexport-timing-trt10.13.3.9-sm86-nvidia-a10.cache" and a10 != a40
    assert a10.parent.as_posix() == "/x"


class _FakeCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return self.data


class _FakeConfig:
    """A builder config whose timing cache behaves like TensorRT's: a foreign cache is refused."""

    def __init__(self, accept=lambda data: True, after=b"new cache"):
        self.accept, self.after, self.attached = accept, after, None

    def create_timing_cache(self, data):
        return _FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch=False):
        ok = self.accept(cache.data)
        self.attached = cache if ok else None
        return ok

    def get_timing_cache(self):
        return None if self.after is None else _FakeCache(self.after)


def test_timing_cache_refused_gets_a_fresh_one_with_one_warning(tmp_path):
    from atexport.export.tensorrt.build import attach_timing_cache, save_timing_cache

    cache = tmp_path / "t.cache"
    cache.write_bytes(b"from another GPU")
    lines = []
    cfg = _FakeConfig(accept=lambda data: data == b"")
    assert attach_timing_cache(cfg, cache, lines.append) == cache
    assert cfg.attached.data == b"" and sum(line.startswith("warning:") for line in lines) == 1
    assert "refused the timing cache" in lines[0]
    assert save_timing_cache(cfg, cache, lines.append) and cache.read_bytes() == b"new cache"
    # get_timing_cache() may return None (Polygraphy guards it): a warning, the old file stays
    lines.clear()
    assert not save_timing_cache(_FakeConfig(after=None), cache, lines.append)
    assert cache.read_bytes() == b"new cache" and "returned no timing cache" in lines[0]
    # a config that refuses even a fresh cache: build without one
    lines.clear()
    assert attach_timing_cache(_FakeConfig(accept=lambda d: False), tmp_path / "u.cache", lines.append) is None
    assert "building without one" in lines[-1]


def test_refit_sidecar_records_what_the_engine_holds(tmp_path, tiny_ckpt, tiny_ckpt_b, monkeypatch):
    """A refit (TensorRT faked: the sidecar logic is what is tested) records the task, its fingerprint and
    the swapped ONNX model, so rebuild_command() rebuilds the new task."""
    import hashlib

    import atexport.runtime.tensorrt as rt_mod
    from atexport.artifact.bank import task_fingerprint
    from atexport.artifact.onnx import read_onnx_model
    from atexport.artifact.sidecar import read_sidecar, rebuild_command, sidecar_path
    from atexport.checkpoint import load_checkpoint
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.export.tensorrt import refit_engine

    sep = export_onnx(tiny_ckpt, tmp_path / "a.onnx", ExportSettings(separable=True, verify=False)).path
    _, meta = read_onnx_model(sep)
    engine = tmp_path / "a.engine"
    engine.write_bytes(b"engine a")
    from atexport.utils.io import sha256_file

    side = engine_sidecar(meta, plan_build(meta, "10.13.3.9", EngineOptions(refit=True, batch="1,4,8")),
                          device=DEVICE, engine_path=engine, engine_sha256=hashlib.sha256(b"engine a").hexdigest(),
                          engine_bytes=8, onnx_path=sep.resolve(), onnx_sha256=sha256_file(sep))
    sidecar_path(engine).write_text(json.dumps(side))
    set_weights = {}

    class Refitter:
        def __init__(self, eng, logger):
            pass

        def get_all_weights(self):
            return list(side["build"]["refittable_weights"])

        def set_named_weights(self, name, w):
            set_weights[name] = np.array(w)
            return True

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):
            return True

    class ILogger:
        Severity = SimpleNamespace(ERROR=1, WARNING=2)

        def __init__(self):
            pass

    fake_trt = SimpleNamespace(Refitter=Refitter, Weights=lambda a: a, ILogger=ILogger)
    fake_engine = SimpleNamespace(serialize=lambda: b"engine b")
    monkeypatch.setattr(rt_mod, "load_engine", lambda path, device=0, log=None: (fake_trt, None, fake_engine, side))
    out = refit_engine(engine, tiny_ckpt_b, tmp_path / "b.engine", verify=False)
    b = load_checkpoint(tiny_ckpt_b)
    new = read_sidecar(out.path)
    assert new["metadata"]["task"] == b.name == "tiny_b"
    assert new["task"] == {"name": "tiny_b", "fingerprint": task_fingerprint(b.state_dict)}
    assert new["onnx"]["path"] == str((tmp_path / "b.engine.onnx").resolve())
    assert new["onnx"]["sha256"] == sha256_file(tmp_path / "b.engine.onnx") and new["onnx"]["refit_of"] == str(sep.resolve())
    cmd = rebuild_command({**new, "engine": {"path": str(out.path)}})
    assert f"--onnx {tmp_path / 'b.engine.onnx'}" in cmd and "--refit" in cmd and "--batch 1,4,8" in cmd
    _, swapped = read_onnx_model(tmp_path / "b.engine.onnx")
    assert swapped.task == "tiny_b" and set(set_weights) == set(side["build"]["refittable_weights"])
    # the swapped ONNX model holds exactly the weights set in the engine
    from atexport.artifact.onnx import read_onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in read_onnx(tmp_path / "b.engine.onnx").graph.initializer}
    for name, w in set_weights.items():
        np.testing.assert_array_equal(inits[name], w)


def test_int8_refit_of_an_unchecked_engine_is_refused(tmp_path, tiny_ckpt_b):
    from atexport.export.tensorrt.refit import check_int8_refit

    onnx_path = tmp_path / "q.onnx"
    onnx.save(_qdq_model(), str(onnx_path))
    side = {"build": {"refittable_weights": ["head.weight", "adapter.w"]}}
    with pytest.raises(BadInputError, match="feed quantized layers"):
        check_int8_refit(side, _meta("int8", separable=True), onnx_path, "engine q.engine")
    with pytest.raises(BadInputError, match="not available to check"):
        check_int8_refit(side, _meta("int8", separable=True), None, "engine q.engine")
    check_int8_refit({"build": {**side["build"], "int8_refit_checked": True}}, _meta("int8", separable=True), None, "e")
