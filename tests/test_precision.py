"""FP16 and INT8 precision ONNX models: graph policy (inspected), parity on real photos, separable models.

The FP32 models come from the real exporter (``export_onnx``), once per session; conversions are cheap
(< 1 s each on the tiny ViT).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from atexport.errors import BadInputError
from atexport.export.precision import (
    Int8Options,
    check_fp16_graph,
    check_int8_graph,
    float_types_by_node,
    qdq_report,
    quantize_int8,
    to_fp16,
)
from atexport.artifact.metadata import read_onnx_metadata


@pytest.fixture(scope="session")
def prec_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("precision")


@pytest.fixture(scope="session")
def tiny_fp32(prec_dir, tiny_ckpt):
    from atexport.export.onnx import export_onnx

    return export_onnx(tiny_ckpt, prec_dir / "tiny.onnx").path


@pytest.fixture(scope="session")
def tiny_sep_fp32(prec_dir, tiny_ckpt):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(tiny_ckpt, prec_dir / "tiny_sep.onnx", ExportSettings(separable=True)).path


@pytest.fixture(scope="session")
def tiny_fp16(prec_dir, tiny_fp32):
    return to_fp16(tiny_fp32, prec_dir / "tiny.fp16.onnx")


@pytest.fixture(scope="session")
def tiny_int8(prec_dir, tiny_fp32):
    """Every Linear layer quantized (no mixed precision): the policy tests inspect the plain placement."""
    return quantize_int8(tiny_fp32, prec_dir / "tiny.int8.onnx", "digits",
                         options=Int8Options(count=64, keep_float="none"))


@pytest.fixture(scope="session")
def digits_test_batch(tiny_fp32):
    """Digits test-split images (never calibration images) through the tiny model's preprocessing."""
    from atexport.export.precision.calibration import load_calibration_set

    meta = read_onnx_metadata(onnx.load(str(tiny_fp32)))
    return load_calibration_set({"name": "t", "source": "digits", "split": "test", "count": 64}).batch(meta.preprocess)


def _torch_reference(ckpt):
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.runtime.torch import TorchRunner

    return TorchRunner(build_model(load_checkpoint(ckpt)), name="pytorch")


# ---------------------------------------------------------------------------------------------- FP16


def test_fp16_keeps_layernorm_and_softmax_fp32(tiny_fp16):
    m = onnx.load(str(tiny_fp16.path))
    types = float_types_by_node(m)
    kinds = {n.name: n.op_type for n in m.graph.node}
    ln = [types[n] for n, k in kinds.items() if k == "LayerNormalization"]
    sm = [types[n] for n, k in kinds.items() if k == "Softmax"]
    mm = [types[n] for n, k in kinds.items() if k == "MatMul"]
    assert ln and set(ln) == {"float32"}
    assert sm and set(sm) == {"float32"}
    assert set(mm) == {"float16"}  # the Linear layers and attention do run in FP16
    assert check_fp16_graph(m) == []
    # io stays float32: apps feed what they fed before
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_parity_and_metadata(tiny_fp16):
    assert tiny_fp16.passed and tiny_fp16.parity
    assert all(r.min_cosine > 0.9999 for r in tiny_fp16.parity)
    meta = read_onnx_metadata(onnx.load(str(tiny_fp16.path)))
    assert meta.precision == "fp16"
    assert meta.extra["precision"]["block_ops"] == ["LayerNormalization", "Softmax"]
    assert meta.extra["precision"]["parity"]
    assert meta.preprocess and meta.class_names  # carried over from the FP32 model


def test_fp16_parity_against_pytorch(tiny_fp32, tiny_ckpt, tmp_path):
    res = to_fp16(tiny_fp32, tmp_path / "ref.fp16.onnx", reference=_torch_reference(tiny_ckpt))
    assert res.passed and res.reference == "pytorch"


def test_check_fp16_graph_flags_fp16_layernorm(tiny_fp32, tmp_path):
    res = to_fp16(tiny_fp32, tmp_path / "bad.fp16.onnx", block_ops=["Softmax"], verify=False)
    problems = check_fp16_graph(onnx.load(str(res.path)))
    assert any("LayerNormalization" in p for p in problems)


def test_fp16_refuses_non_fp32_input(tiny_fp16, tmp_path):
    with pytest.raises(BadInputError, match="already a fp16 model"):
        to_fp16(tiny_fp16.path, tmp_path / "again.onnx")


def _vit_small_checkpoint(path):
    """vit_small_patch16_224, random init, rank-16 adapters on every block with non-zero weights."""
    import torch

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import Checkpoint, save_checkpoint, trainable_state
    from atexport.models import ModelSpec, backbone_fingerprint, create_backbone, preprocess_config

    spec = ModelSpec(backbone="vit_small_patch16_224", num_classes=100, source={"kind": "random", "seed": 0},
                     class_names=[f"c{i}" for i in range(100)])
    model = create_backbone(spec)
    fp = backbone_fingerprint(model)
    cfg = AdapterConfig(rank=16, every=1)
    inject_adapters(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter.up." in name or name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ck = Checkpoint(model=spec, adapter=cfg, regime="adapter", fingerprint=fp,
                    state_dict=trainable_state(model, "adapter"), preprocess=preprocess_config(model))
    return save_checkpoint(ck, path)


def test_fp16_vit_small_parity(tmp_path):
    """vit_small (random init, adapters on every block): LayerNorm/Softmax FP32 and the fp16 tolerance
    on real photos, against the FP32 model (itself held to 1e-3 of PyTorch at export)."""
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    ckpt = _vit_small_checkpoint(tmp_path / "vit_small.pt")
    fp32 = export_onnx(ckpt, tmp_path / "vit_small.onnx", ExportSettings(verify=False, simplify=False)).path
    res = to_fp16(fp32, tmp_path / "vit_small.fp16.onnx", config={
        "fp16": {"block_ops": ["LayerNormalization", "Softmax"]},
        "parity": {"max_images": 13, "random_inputs": 4, "batch_sizes": [4]},
    })
    assert res.passed, res.parity
    assert check_fp16_graph(onnx.load(str(res.path))) == []
    assert res.graph["kept_fp32"]["LayerNormalization"]["fp32"] == 25


# ---------------------------------------------------------------------------------------------- INT8


def test_int8_qdq_only_around_linear_layers(tiny_int8):
    m = onnx.load(str(tiny_int8.path))
    rep = qdq_report(m)
    assert set(rep["dq_consumers"]) <= {"MatMul", "Gemm"}
    assert rep["quantized_nodes"].get("MatMul", 0) == 4 * 6  # qkv, proj, fc1, fc2, adapter down/up per block
    assert rep["quantized_nodes"].get("Gemm", 0) == 1  # head
    assert rep["nonzero_zero_points"] == 0 and set(rep["quant_types"]) == {"INT8"}  # TensorRT: symmetric S8
    assert rep["per_channel_dq"] >= 25  # one per-channel weight DQ per Linear layer
    assert check_int8_graph(m) == []
    # attention's activation x activation MatMuls stay float
    prod = {o: n for n in m.graph.node for o in n.output}
    att = [n for n in m.graph.node if n.op_type == "MatMul" and not any(
        i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(att) == 4 * 2


def test_int8_runs_and_passes_tolerance(tiny_int8):
    assert tiny_int8.passed
    assert min(r.min_cosine for r in tiny_int8.parity) > 0.995
    meta = read_onnx_metadata(onnx.load(str(tiny_int8.path)))
    assert meta.precision == "int8"
    p = meta.extra["precision"]
    assert p["target"] == "tensorrt" and p["op_policy"] == "linear"
    assert p["calibration"]["name"] == "digits" and p["calibration"]["images"] == 64
    assert p["keep_float"] is None


def test_all_ops_int8_is_measurably_worse(tiny_fp32, tiny_int8, tmp_path):
    """Why the Linear-only policy exists: quantizing Adds, LayerNorm, Softmax, GELU too costs accuracy."""
    from atexport.errors import ParityError

    try:
        worse = quantize_int8(tiny_fp32, tmp_path / "all.int8.onnx", "digits",
                              options=Int8Options(count=64, op_policy="all", cache=False))
    except ParityError as e:  # failing the int8 tolerance is this model's point; compare its rows anyway
        worse = e.result
    rep = qdq_report(onnx.load(str(worse.path or worse.failed_path)))
    assert {"Add", "LayerNormalization", "Softmax", "Gelu"} <= set(rep["dq_consumers"])
    lin = {r.name.split(" ", 1)[1]: r for r in tiny_int8.parity}
    for r in worse.parity:
        ref = lin[r.name.split(" ", 1)[1]]
        assert r.mean_cosine < ref.mean_cosine
        assert r.max_abs > 2 * ref.max_abs


def test_int8_cpu_target_u8s8(tiny_fp32, tmp_path):
    res = quantize_int8(tiny_fp32, tmp_path / "cpu.int8.onnx", "digits", options=Int8Options(count=64, target="cpu"))
    rep = qdq_report(onnx.load(str(res.path)))
    assert "UINT8" in rep["quant_types"] and set(rep["dq_consumers"]) <= {"MatMul", "Gemm"}
    assert res.passed


def test_int8_parity_against_pytorch(tiny_fp32, tiny_ckpt, tmp_path):
    res = quantize_int8(tiny_fp32, tmp_path / "ref.int8.onnx", "digits", reference=_torch_reference(tiny_ckpt),
                        options=Int8Options(count=64))
    assert res.passed and res.reference == "pytorch"


# ------------------------------------------------------------- INT8 mixed precision (keep-float layers)


def _dq_fed(model) -> dict[str, int]:
    """Linear node name -> how many of its inputs come from a DequantizeLinear."""
    prod = {o: n for n in model.graph.node for o in n.output}
    return {n.name: sum(1 for i in n.input if i in prod and prod[i].op_type == "DequantizeLinear")
            for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}


def _rel_error(fp32_path, int8_path, x):
    from atexport.export.precision import logit_error
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(str(fp32_path)) as a, OnnxRuntimeRunner(str(int8_path)) as b:
        return logit_error(a.infer(x), b.infer(x))["rel_error"]


def test_layer_names_follow_the_pytorch_modules(tiny_fp32):
    from atexport.export.precision import layer_names, linear_nodes

    m = onnx.load(str(tiny_fp32))
    names = layer_names(m)
    assert set(names) == set(linear_nodes(m)[0])
    expected = {f"blocks.{b}.block.{r}" for b in range(4) for r in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    expected |= {f"blocks.{b}.adapter.{r}" for b in range(4) for r in ("down", "up")} | {"head"}
    assert set(names.values()) == expected


@pytest.mark.parametrize("value, parsed", [
    (None, ("none", None)), ("none", ("none", None)), (0, ("none", None)), ("auto", ("auto", None)),
    (3, ("count", 3)), ("3", ("count", 3)), ("head,*.adapter.*", ("layers", ["head", "*.adapter.*"])),
    (["head"], ("layers", ["head"])),
])
def test_parse_keep_float(value, parsed):
    from atexport.export.precision import parse_keep_float

    assert parse_keep_float(value) == parsed


def test_keep_float_auto_keeps_sensitive_layers_float_and_lowers_logit_error(tiny_fp32, tiny_int8, digits_test_batch, tmp_path):
    """auto: the layers it picks are plain float MatMul/Gemm in the file (no DQ input), every other Linear
    layer keeps its Q/DQ, and the logit error on held-out digits images drops well below plain INT8's."""
    res = quantize_int8(tiny_fp32, tmp_path / "auto.int8.onnx", "digits",
                        options=Int8Options(count=64, keep_float="auto"))
    assert res.passed
    m = onnx.load(str(res.path))
    kf = read_onnx_metadata(m).extra["precision"]["keep_float"]
    assert kf["requested"] == "auto" and kf["layers"] and kf["float_share"] <= 0.1
    assert [r["layer"] for r in kf["sensitivity"]["ranking"]]  # the measured ranking is recorded
    assert kf["auto"]["trace"][0]["k"] == 0
    fed = _dq_fed(m)
    kept = set(kf["nodes"])
    assert all(fed[n] == 0 for n in kept)
    from atexport.export.precision import linear_nodes

    assert all(fed[n] == 2 for n in linear_nodes(onnx.load(str(tiny_fp32)))[0] if n not in kept)
    assert check_int8_graph(m) == []
    assert res.graph["kept_float"]["layers"] == kf["layers"] and "float:" in res.summary()
    plain = _rel_error(tiny_fp32, tiny_int8.path, digits_test_batch)
    mixed = _rel_error(tiny_fp32, res.path, digits_test_batch)
    assert mixed < 0.75 * plain, (mixed, plain)  # measured ~0.55x


def test_keep_float_by_name(tiny_fp32, tiny_int8, digits_test_batch, tmp_path):
    res = quantize_int8(tiny_fp32, tmp_path / "named.int8.onnx", "digits", verify=False,
                        options=Int8Options(count=64, keep_float="head,*.adapter.*"))
    m = onnx.load(str(res.path))
    kf = read_onnx_metadata(m).extra["precision"]["keep_float"]
    assert len(kf["layers"]) == 9 and "head" in kf["layers"] and "sensitivity" not in kf
    rep = qdq_report(m)
    assert "Gemm" not in rep["quantized_nodes"] and rep["quantized_nodes"]["MatMul"] == 16
    assert _rel_error(tiny_fp32, res.path, digits_test_batch) < _rel_error(tiny_fp32, tiny_int8.path, digits_test_batch)
    with pytest.raises(BadInputError, match="no quantized Linear layer has that name"):
        quantize_int8(tiny_fp32, tmp_path / "bad.int8.onnx", "digits",
                      options=Int8Options(count=64, keep_float=["blocks.9.mlp.fc3"]))


def test_cli_int8_keep_float(tiny_fp32, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import atexport.export.tensorrt.stage as trt_mod
    from atexport.cli import cli
    from atexport.errors import MissingDependencyError

    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: None)
    out = tmp_path / "cli.int8.onnx"
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(tiny_fp32), "--precision", "int8", "--calib", "digits",
                                 "--calib-count", "32", "--int8-keep-float", "head", "--onnx-out", str(out), "--no-verify"])
    assert r.exit_code == MissingDependencyError.exit_code, r.output
    kf = read_onnx_metadata(onnx.load(str(out))).extra["precision"]["keep_float"]
    assert kf["layers"] == ["head"] and _dq_fed(onnx.load(str(out)))[kf["nodes"][0]] == 0
    r = CliRunner().invoke(cli, ["trt", "--onnx", str(tiny_fp32), "--precision", "fp16", "--int8-keep-float", "auto"])
    assert r.exit_code != 0 and "applies to --precision int8" in r.output


@pytest.mark.parametrize("precision, options, flag", [
    ("fp16", {"calib": "digits"}, "--calib applies to --precision int8, not fp16"),
    ("fp16", {"count": 32}, "--calib-count applies to --precision int8"),
    ("fp16", {"method": "entropy"}, "--calib-method applies to --precision int8"),
    ("fp16", {"cache": False}, "--no-calib-cache applies to --precision int8"),
    ("fp16", {"keep_float": "auto"}, "--int8-keep-float applies to --precision int8, not fp16"),
    ("fp16", {"target": "cpu"}, "--target applies to --precision int8"),
    ("fp16", {"op_policy": "all"}, "op_policy applies to --precision int8"),
    ("int8", {"calib": "digits", "block_ops": ["Softmax"]}, "block_ops applies to --precision fp16, not int8"),
    ("int8", {"calib": "digits", "keep_io_types": False}, "keep_io_types applies to --precision fp16"),
    ("int8", {}, "INT8 needs calibration images"),
    ("fp32", {}, "expected fp16 or int8"),
    ("fp32", {"calib": "digits"}, "--calib applies to --precision int8, not fp32"),
    ("bf16", {}, "--precision bf16: expected one of"),
])
def test_convert_precision_refuses_flags_that_do_not_apply(tiny_fp32, tmp_path, precision, options, flag):
    """The library refuses a flag of another precision (exit 2, one sentence), before reading the model;
    the command line only passes the flags on."""
    from atexport.export.precision import Fp16Options, convert_precision

    options = dict(options)
    fp16 = {k: options.pop(k) for k in ("block_ops", "keep_io_types") if k in options}
    with pytest.raises(BadInputError, match=re.escape(flag)) as e:
        convert_precision(tiny_fp32, precision, tmp_path / "out.onnx", verify=False, int8=Int8Options(**options),
                          fp16=Fp16Options(**fp16))
    assert e.value.exit_code == 2
    assert not (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------------------------- separable models


def test_separable_precision_keeps_tensors_swappable(tiny_sep_fp32, tiny_ckpt_b, tmp_path):
    """Swappable tensors stay FP32 overridable initializers: swapping task B into the FP16/INT8 model
    gives what converting a model of task B would."""
    from atexport.artifact.onnx import check_manifest
    from atexport.artifact.fit import check_fits
    from atexport.checkpoint import load_checkpoint
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.parity import photo_batch

    fp16 = to_fp16(tiny_sep_fp32, tmp_path / "sep.fp16.onnx")
    int8 = quantize_int8(tiny_sep_fp32, tmp_path / "sep.int8.onnx", "digits",
                         options=Int8Options(count=64, keep_float="none"))
    for res in (fp16, int8):
        m = onnx.load(str(res.path))
        meta = read_onnx_metadata(m)
        check_manifest(m, meta.manifest, "precision model")
        inits = {i.name: i for i in m.graph.initializer}
        for e in meta.manifest.values():
            assert inits[e["initializer"]].data_type == onnx.TensorProto.FLOAT
    assert int8.graph["qdq"]["quantized_nodes"].get("MatMul", 0) == 4 * 4  # adapters stay float
    assert set(int8.graph["qdq"]["dq_consumers"]) <= {"MatMul", "Gemm"}
    assert "swappable" in int8.graph and "swappable" in fp16.graph

    meta = read_onnx_metadata(onnx.load(str(tiny_sep_fp32)))
    x = photo_batch(meta.preprocess)
    feeds_b = check_fits(meta, load_checkpoint(tiny_ckpt_b).task_weights())
    with OnnxRuntimeRunner(str(tiny_sep_fp32)) as a, OnnxRuntimeRunner(str(tiny_sep_fp32), feeds=feeds_b) as b:
        la, lb = a.infer(x), b.infer(x)
    assert np.abs(la - lb).max() > 1e-2  # task B really differs
    with OnnxRuntimeRunner(str(fp16.path), feeds=feeds_b) as r16:
        l16 = r16.infer(x)
    cos = (lb * l16).sum(1) / np.linalg.norm(lb, axis=1) / np.linalg.norm(l16, axis=1)
    assert cos.min() > 0.9999 and np.abs(lb - l16).max() < 5e-3


def test_calibration_drops_only_the_expected_ort_warnings(tiny_sep_fp32, tmp_path, capfd):
    """A separable model's swappable tensors are graph inputs on purpose: ONNX Runtime's 18 "Initializer ...
    appears in graph inputs" warnings are dropped while INT8 calibrates, any other message still reaches
    stderr, and ONNX Runtime's own logger is back afterwards."""
    import onnxruntime as ort

    from atexport.export.precision.calibrate import expected_ort_messages

    def session():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(str(tiny_sep_fp32), so, providers=["CPUExecutionProvider"])

    capfd.readouterr()
    quantize_int8(tiny_sep_fp32, tmp_path / "quiet.int8.onnx", "digits", verify=False,
                  options=Int8Options(count=32, keep_float="none", cache=False))
    assert "appears in graph inputs" not in capfd.readouterr().err
    if hasattr(ort, "set_default_logger_callback"):  # older ONNX Runtime: the block's severity is raised instead
        with expected_ort_messages(("a message ONNX Runtime never writes",)):
            session()
        assert capfd.readouterr().err.count("appears in graph inputs") == 18  # not expected: passed on
    session()
    assert capfd.readouterr().err.count("appears in graph inputs") == 18  # the platform logger is back
