"""FP16 and INT8 precision ONNX models: graph policy (inspected), parity on real photos, separable models.

The FP32 models come from the real exporter (``export_onnx``), once per session; conversions are cheap
(< 1 s each on the tiny ViT).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from atexport.errors import BadInputError
from atexport.export.precision import (
    check_fp16_graph,
    check_int8_graph,
    float_types_by_node,
    qdq_report,
    quantize_int8,
    to_fp16,
)
from atexport.metadata import read_onnx_metadata


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

    return export_onnx(tiny_ckpt, prec_dir / "tiny_sep.onnx", separable=True).path


@pytest.fixture(scope="session")
def tiny_fp16(prec_dir, tiny_fp32):
    return to_fp16(tiny_fp32, prec_dir / "tiny.fp16.onnx")


@pytest.fixture(scope="session")
def tiny_int8(prec_dir, tiny_fp32):
    return quantize_int8(tiny_fp32, prec_dir / "tiny.int8.onnx", "digits", count=64)


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

    ckpt = _vit_small_checkpoint(tmp_path / "vit_small.pt")
    fp32 = export_onnx(ckpt, tmp_path / "vit_small.onnx", verify=False, simplify=False).path
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


def test_all_ops_int8_is_measurably_worse(tiny_fp32, tiny_int8, tmp_path):
    """Why the Linear-only policy exists: quantizing Adds, LayerNorm, Softmax, GELU too costs accuracy."""
    worse = quantize_int8(tiny_fp32, tmp_path / "all.int8.onnx", "digits", count=64, op_policy="all", cache=False)
    rep = qdq_report(onnx.load(str(worse.path)))
    assert {"Add", "LayerNormalization", "Softmax", "Gelu"} <= set(rep["dq_consumers"])
    lin = {r.name.split(" ", 1)[1]: r for r in tiny_int8.parity}
    for r in worse.parity:
        ref = lin[r.name.split(" ", 1)[1]]
        assert r.mean_cosine < ref.mean_cosine
        assert r.max_abs > 2 * ref.max_abs


def test_int8_cpu_target_u8s8(tiny_fp32, tmp_path):
    res = quantize_int8(tiny_fp32, tmp_path / "cpu.int8.onnx", "digits", count=64, target="cpu")
    rep = qdq_report(onnx.load(str(res.path)))
    assert "UINT8" in rep["quant_types"] and set(rep["dq_consumers"]) <= {"MatMul", "Gemm"}
    assert res.passed


def test_int8_parity_against_pytorch(tiny_fp32, tiny_ckpt, tmp_path):
    res = quantize_int8(tiny_fp32, tmp_path / "ref.int8.onnx", "digits", count=64, reference=_torch_reference(tiny_ckpt))
    assert res.passed and res.reference == "pytorch"


# ---------------------------------------------------------------------------------- separable models


def test_separable_precision_keeps_tensors_swappable(tiny_sep_fp32, tiny_ckpt_b, tmp_path):
    """Swappable tensors stay FP32 overridable initializers: swapping task B into the FP16/INT8 model
    gives what converting a model of task B would."""
    from atexport.export.onnx import check_manifest
    from atexport.export.swap import load_task_weights
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.verify.parity import photo_batch

    fp16 = to_fp16(tiny_sep_fp32, tmp_path / "sep.fp16.onnx")
    int8 = quantize_int8(tiny_sep_fp32, tmp_path / "sep.int8.onnx", "digits", count=64)
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
    feeds_b = load_task_weights(tiny_ckpt_b, meta)
    with OnnxRuntimeRunner(str(tiny_sep_fp32)) as a, OnnxRuntimeRunner(str(tiny_sep_fp32), feeds=feeds_b) as b:
        la, lb = a.infer(x), b.infer(x)
    assert np.abs(la - lb).max() > 1e-2  # task B really differs
    with OnnxRuntimeRunner(str(fp16.path), feeds=feeds_b) as r16:
        l16 = r16.infer(x)
    cos = (lb * l16).sum(1) / np.linalg.norm(lb, axis=1) / np.linalg.norm(l16, axis=1)
    assert cos.min() > 0.9999 and np.abs(lb - l16).max() < 5e-3
