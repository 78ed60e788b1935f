"""TensorRT build planning for 10.x and 11.x (no TensorRT needed), the sidecar and its compatibility
check, the missing-TensorRT path of ``atexport trt``; engine builds and refit where TensorRT is installed."""

from __future__ import annotations

import json

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
