"""Precision ONNX models: FP16 mixed precision and explicit INT8 (Q/DQ), verified before any engine.

The ONNX model is the contract: precision is decided here and baked into an ONNX file (FP16 weights
and casts, or QuantizeLinear/DequantizeLinear nodes); ONNX Runtime checks it on the CPU against the
FP32 reference; TensorRT (10.x strongly typed, 11.x always strongly typed) then builds exactly that
file. Both functions take an ONNX file in and write an ONNX file out, atomically, with the atexport
metadata carried over (``precision`` updated, the recipe and parity results in ``extra.precision``).

* :func:`to_fp16`: ONNX Runtime's float16 converter (the same algorithm as onnxconverter-common's)
  with a block list: ``LayerNormalization`` and ``Softmax`` stay FP32 (ViT residual streams reach
  |x| ~ 1e3, so x^2 overflows FP16), graph inputs/outputs stay FP32.
* :func:`quantize_int8`: ``onnxruntime.quantization`` static QDQ, per-channel symmetric INT8 weights,
  Q/DQ only on the inputs and weights of the Linear layers (MatMul/Gemm with a constant weight); the
  residual Adds, LayerNorm, Softmax, GELU and attention's activation-by-activation MatMuls stay in
  float. ``target="tensorrt"`` uses symmetric INT8 activations (zero points 0, what TensorRT accepts);
  ``target="cpu"`` uses unsigned asymmetric activations (U8S8), what ONNX Runtime's x86 kernels favour.
  Calibration results are cached (:mod:`atexport.export.calibration`).

Separable models (swappable adapter and head tensors, listed in the metadata ``manifest``): the
swappable tensors stay FP32 overridable initializers in both conversions (FP16 casts them inside the
graph; INT8 leaves the layers that use them unquantized), so ``atexport swap`` works unchanged.

Graph inspection helpers (:func:`float_types_by_node`, :func:`fp16_report`, :func:`qdq_report`,
:func:`check_fp16_graph`, :func:`check_int8_graph`) are what the tests and the CLI use to show that
the policy was applied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from atexport import configs
from atexport.errors import AtexportError, BadInputError, ParityError, require

PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("tensorrt", "cpu")
METHODS = ("minmax", "percentile", "entropy")
OP_POLICIES = ("linear", "all")
LINEAR_OPS = ("MatMul", "Gemm")
# Ops that only move or reshape a weight between its initializer and the layer that uses it.
_WEIGHT_PASSTHROUGH = ("Transpose", "Cast", "Reshape", "Identity", "Unsqueeze", "Squeeze")


@dataclass
class PrecisionResult:
    """What :func:`to_fp16` or :func:`quantize_int8` produced.

    Attributes:
        path: the written model (``None`` when parity failed).
        precision: ``fp16`` or ``int8``.
        metadata: the metadata written into it.
        parity: parity rows against the reference (empty when not verified).
        reference: what the parity reference was (``pytorch`` or ``onnx-fp32``).
        graph: a summary of the graph (ops kept in FP32, Q/DQ placement).
        calibration: calibration set, image count and whether the cache was reused (INT8).
        seconds: wall time per step.
        failed_path: where a model that failed parity was kept.
    """

    path: Path | None
    precision: str
    metadata: Any
    parity: list = field(default_factory=list)
    reference: str | None = None
    graph: dict = field(default_factory=dict)
    calibration: dict | None = None
    seconds: dict = field(default_factory=dict)
    failed_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.parity)

    def summary(self) -> str:
        g = self.graph
        lines = [f"precision:  {self.precision} ({g.get('recipe', '')})"]
        if self.precision == "fp16":
            kept = ", ".join(f"{k} {v['fp32']}/{v['total']}" for k, v in g.get("kept_fp32", {}).items())
            lines.append(f"fp32 ops:   {kept or 'none'}; {g.get('fp16_nodes', 0)} of {g.get('nodes', 0)} nodes compute in FP16")
        if self.precision == "int8":
            q = g.get("qdq", {})
            cons = ", ".join(f"{k} {v}" for k, v in q.get("quantized_nodes", {}).items())
            lines.append(f"quantized:  {cons or 'nothing'} ({q.get('QuantizeLinear', 0)} Q, {q.get('DequantizeLinear', 0)} DQ)")
            c = self.calibration or {}
            if c:
                lines.append(
                    f"calibrated: {c.get('name')} ({c.get('images')} images, {c.get('method')}), "
                    f"cache {c.get('cache_status')} [{c.get('cache')}]"
                )
        if g.get("swappable"):
            lines.append(f"swappable:  {g['swappable']}")
        lines.append("time:       " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def load_precision_config(config: str | Mapping = "precision") -> dict:
    """The ``export_configs/precision.yaml`` preset (or a dict of the same shape)."""
    data = dict(config) if isinstance(config, Mapping) else configs.load("export_configs", config)
    for section in ("fp16", "int8", "calibration", "parity"):
        data.setdefault(section, {})
    return data


# --------------------------------------------------------------------------------------------------
# Graph inspection
# --------------------------------------------------------------------------------------------------

_FLOATS = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


def _infer(model):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception:  # inference is best effort here: unknown types simply stay unknown
        return model


def _elem_types(model) -> dict[str, int]:
    g = model.graph
    types = {}
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def float_types_by_node(model, op_types: Sequence[str] | None = None) -> dict[str, str]:
    """Node name -> the float type it computes in (the type of its first float input).

    Args:
        model: an ``onnx.ModelProto`` (shape inference is run on a copy to type every tensor).
        op_types: only these op types (default: all nodes).
    """
    inferred = _infer(model)
    types = _elem_types(inferred)
    out = {}
    for n in inferred.graph.node:
        if op_types is not None and n.op_type not in op_types:
            continue
        for i in n.input:
            t = types.get(i)
            if t in _FLOATS:
                out[n.name] = _FLOATS[t]
                break
    return out


def fp16_report(model, watch: Sequence[str] = ("LayerNormalization", "Softmax", "MatMul", "Gemm", "Gelu", "Add")) -> dict:
    """How many nodes of each watched op type compute in FP32 and in FP16."""
    by_node = float_types_by_node(model)
    kinds = {n.name: n.op_type for n in model.graph.node}
    report: dict[str, dict] = {}
    for name, t in by_node.items():
        op = kinds.get(name)
        if op not in watch:
            continue
        r = report.setdefault(op, {"fp32": 0, "fp16": 0, "total": 0})
        r["total"] += 1
        if t == "float32":
            r["fp32"] += 1
        elif t == "float16":
            r["fp16"] += 1
    return {
        "kept_fp32": {k: v for k, v in sorted(report.items())},
        "fp16_nodes": sum(1 for t in by_node.values() if t == "float16"),
        "nodes": len(model.graph.node),
        "casts": sum(1 for n in model.graph.node if n.op_type == "Cast"),
    }


def check_fp16_graph(model, keep_fp32: Sequence[str] = ("LayerNormalization", "Softmax")) -> list[str]:
    """Problems with an FP16 model: a ``keep_fp32`` op computing in FP16, or no FP16 compute at all."""
    by_node = float_types_by_node(model)
    kinds = {n.name: n.op_type for n in model.graph.node}
    problems = [
        f"{kinds[name]} node {name} computes in {t}"
        for name, t in by_node.items()
        if kinds.get(name) in keep_fp32 and t != "float32"
    ]
    if not any(t == "float16" for t in by_node.values()):
        problems.append("no node computes in float16")
    return problems


def toposort(model) -> None:
    """Sort the main graph's nodes topologically, in place (stable: keeps the order where it can)."""
    g = model.graph
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise AtexportError(f"graph has a cycle or a missing input at node {rest[0].name} (a bug).")
        pending = rest
    copies = []
    for n in ordered:
        c = type(n)()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model) -> dict[str, list]:
    cons: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return cons


def qdq_report(model) -> dict:
    """Where an INT8 model's Q/DQ nodes are: which op types consume dequantized tensors, zero points,
    quantized types, per-channel weights."""
    import onnx
    from onnx import numpy_helper

    prod = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: Counter = Counter()
    quantized_nodes: Counter = Counter()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fed = [i for i in n.input if i in prod and prod[i].op_type == "DequantizeLinear"]
        if fed:
            consumers[n.op_type] += len(fed)
            quantized_nodes[n.op_type] += 1
    zero_points_nonzero = 0
    qtypes: Counter = Counter()
    per_channel = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            qtypes[onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type)] += 1
            if np.any(zp != 0):
                zero_points_nonzero += 1
        if n.input[1] in inits and int(np.prod(inits[n.input[1]].dims or [1])) > 1:
            per_channel += 1
    counts = Counter(n.op_type for n in model.graph.node)
    return {
        "QuantizeLinear": counts.get("QuantizeLinear", 0),
        "DequantizeLinear": counts.get("DequantizeLinear", 0),
        "quantized_nodes": dict(sorted(quantized_nodes.items())),
        "dq_consumers": dict(sorted(consumers.items())),
        "nonzero_zero_points": zero_points_nonzero,
        "quant_types": dict(qtypes),
        "per_channel_dq": per_channel,
    }


def check_int8_graph(model, allowed: Sequence[str] = LINEAR_OPS, symmetric: bool = True) -> list[str]:
    """Problems with an INT8 model: a dequantized tensor feeding anything but ``allowed`` ops, no
    quantized node at all, or (``symmetric``) a non-zero or unsigned zero point."""
    rep = qdq_report(model)
    problems = [f"{op} consumes {k} dequantized tensors" for op, k in rep["dq_consumers"].items() if op not in allowed]
    if not rep["quantized_nodes"]:
        problems.append("no node is quantized")
    if symmetric:
        if rep["nonzero_zero_points"]:
            problems.append(f"{rep['nonzero_zero_points']} Q/DQ nodes have non-zero zero points (TensorRT needs symmetric)")
        unsigned = {k: v for k, v in rep["quant_types"].items() if k != "INT8"}
        if unsigned:
            problems.append(f"Q/DQ types {unsigned} are not INT8 (TensorRT needs signed INT8)")
    return problems


def _weight_source(name: str, prod: dict, inits: set) -> str | None:
    """The initializer a tensor comes from through weight-only ops (Transpose, Cast...), else None."""
    seen = 0
    while name not in inits:
        node = prod.get(name)
        if node is None or node.op_type not in _WEIGHT_PASSTHROUGH or seen > 8:
            return None
        name, seen = node.input[0], seen + 1
    return name


def linear_nodes(model, swappable: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The Linear layers: MatMul/Gemm nodes whose weight (input B) is a constant initializer.

    Returns:
        ``(quantizable, swappable_linear)``: node names with a plain constant weight, and those whose
        weight is an overridable (swappable) initializer, which must stay unquantized.
    """
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    prod = _producers(model)
    swappable = set(swappable) | (inits & graph_inputs)
    plain, swap = [], []
    for n in model.graph.node:
        if n.op_type not in LINEAR_OPS or len(n.input) < 2:
            continue
        src = _weight_source(n.input[1], prod, inits)
        if src is None:
            continue  # activation x activation (attention scores, attention x V): not a Linear layer
        (swap if src in swappable else plain).append(n.name)
    return plain, swap


# --------------------------------------------------------------------------------------------------
# Shared plumbing: reading, metadata, parity, atomic write
# --------------------------------------------------------------------------------------------------


def _read(onnx_in, flag: str = "--onnx"):
    from atexport.export.swap import read_onnx

    if not isinstance(onnx_in, (str, os.PathLike)):
        return onnx_in, "in-memory model"
    return read_onnx(onnx_in, flag), str(onnx_in)


def _metadata(model, where: str):
    from atexport.metadata import read_onnx_metadata

    meta = read_onnx_metadata(model, where)
    if meta.precision != "fp32":
        raise BadInputError(
            f"{where} is already a {meta.precision} model; convert the FP32 model exported by 'atexport onnx'."
        )
    return meta


def failed_path_for(output: str | os.PathLike) -> Path:
    p = Path(output)
    return p.with_name(f"{p.stem}.failed{p.suffix or '.onnx'}")


def default_output(onnx_in: str | os.PathLike, precision: str) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx`` beside it."""
    p = Path(onnx_in)
    return p.with_name(f"{p.stem}.{precision}.onnx")


def _verify(data: bytes, src_model, meta, precision: str, reference, images, par: dict, say):
    """Parity of ``data`` against ``reference`` (a Runner) or, by default, the FP32 ONNX model in ORT."""
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.verify.parity import check_parity, photo_batch

    ref_label = "onnx-fp32"
    if reference is None:
        reference = OnnxRuntimeRunner(src_model.SerializeToString(), name="onnx-fp32")
    else:
        ref_label = getattr(reference, "name", "reference")
    in_shape = [int(v) for v in meta.preprocess["input_size"]]
    photos = photo_batch(meta.preprocess, extra=images, max_images=par.get("max_images"))
    batch = meta.input["shape"][0]
    sizes = [int(batch)] if isinstance(batch, int) else [int(b) for b in par.get("batch_sizes", [1, 4])]
    say(f"checking {precision} parity against {ref_label} on {len(photos)} photos ...")
    with reference as ref, OnnxRuntimeRunner(data, name=f"onnx-{precision}", optimization=par.get("optimization", "all")) as cand:
        rows = check_parity(
            ref, cand, photos, precision,
            random_inputs=_per_precision(par.get("random_inputs", 0), precision),
            input_shape=in_shape, seed=int(par.get("seed", 0)), batch_sizes=sizes,
            tolerances=par.get("tolerances", "tolerances"), label=precision,
        )
    return rows, ref_label


def _per_precision(value, precision: str) -> int:
    """A config value given once or per precision (``{fp16: 8, int8: 8}``)."""
    if isinstance(value, Mapping):
        value = value.get(precision, 0)
    return int(value or 0)


def _finish(model, meta, output, precision, result: PrecisionResult, verify, src_model, reference, images, par, say):
    """Write metadata, verify, then write ``output`` atomically (or ``.failed.onnx`` and raise)."""
    from atexport.metadata import write_onnx_metadata
    from atexport.utils.io import atomic_write_bytes

    write_onnx_metadata(model, meta)
    data = model.SerializeToString()
    if verify:
        t0 = time.perf_counter()
        result.parity, result.reference = _verify(data, src_model, meta, precision, reference, images, par, say)
        result.seconds["verify"] = time.perf_counter() - t0
        meta.extra.setdefault("precision", {})["parity"] = [r.to_dict() for r in result.parity]
        meta.extra["precision"]["reference"] = result.reference
        write_onnx_metadata(model, meta)
        data = model.SerializeToString()
    if verify and not result.passed:
        from atexport.verify.compare import format_table

        failed = failed_path_for(output)
        atomic_write_bytes(failed, data)
        result.failed_path = failed
        err = ParityError(
            f"the {precision} model does not match {result.reference} within the {precision} tolerances:\n"
            f"{format_table(result.parity)}\nNothing was written to {output}; the failing model is kept at {failed}."
        )
        err.result = result
        raise err
    atomic_write_bytes(output, data)
    result.path = Path(output)
    return result


def _prepare_output(onnx_in, onnx_out, precision):
    from atexport.utils.io import check_writable

    if onnx_out is None:
        if not isinstance(onnx_in, (str, os.PathLike)):
            raise BadInputError("give an output path: the input model was not read from a file.")
        onnx_out = default_output(onnx_in, precision)
    out = check_writable(onnx_out, "-o")
    if isinstance(onnx_in, (str, os.PathLike)) and Path(onnx_in).resolve() == out.resolve():
        raise BadInputError(f"{out}: that is the input model; choose another output path.")
    return out


@contextlib.contextmanager
def _quiet_ort_quantization():
    """onnxruntime.quantization logs advice through the root logger on every call ("consider
    pre-processing"); raise the root level for the duration of the call only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------------------------------
# FP16
# --------------------------------------------------------------------------------------------------


def to_fp16(
    onnx_in,
    onnx_out=None,
    *,
    block_ops: Sequence[str] | None = None,
    keep_io_types: bool | None = None,
    verify: bool = True,
    reference=None,
    images=None,
    config: str | Mapping = "precision",
    log=None,
) -> PrecisionResult:
    """Convert an FP32 atexport ONNX model to FP16 mixed precision, check parity, write it atomically.

    Args:
        onnx_in: the FP32 model (path or ``onnx.ModelProto``) exported by ``atexport onnx``.
        onnx_out: output path; default ``<stem>.fp16.onnx`` beside the input.
        block_ops: op types kept in FP32 (default from ``export_configs/precision.yaml``:
            LayerNormalization, Softmax).
        keep_io_types: keep graph inputs and outputs FP32 (default: on), so apps feed float32 as before.
        verify: check parity against ``reference`` on real photos (on by default).
        reference: a runner to compare against (e.g. a :class:`~atexport.runtime.torch.TorchRunner` on the
            PyTorch model); default: the FP32 input model in ONNX Runtime, itself verified against
            PyTorch at export.
        images: extra real images for parity (a folder or list).
        config: precision preset name in ``export_configs/`` or a dict.
        log: optional callable receiving progress lines.

    Raises:
        BadInputError: unreadable input, input without atexport metadata or not FP32, bad output path.
        ParityError: outside the fp16 tolerance; the model is kept at ``<stem>.failed.onnx``.
    """
    say = log or (lambda *_: None)
    require("onnxruntime", "converting ONNX models to FP16 (onnxruntime.transformers.float16)", "onnx")
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    cfg = load_precision_config(config)
    f16 = cfg["fp16"]
    t_start = time.perf_counter()
    src, where = _read(onnx_in)
    meta = _metadata(src, where)
    out = _prepare_output(onnx_in, onnx_out, "fp16")
    block = list(block_ops if block_ops is not None else f16.get("block_ops", ["LayerNormalization", "Softmax"]))
    keep_io = bool(f16.get("keep_io_types", True) if keep_io_types is None else keep_io_types)

    model = onnx.ModelProto()
    model.CopyFrom(src)
    # Swappable tensors: take their initializers out so the converter sees plain FP32 graph inputs
    # (kept FP32, cast to FP16 inside the graph), then put the FP32 values back.
    swappable = [e.get("initializer", k) for k, e in (meta.manifest or {}).items()]
    held = {i.name: i for i in model.graph.initializer if i.name in set(swappable)}
    if held:
        keep = [i for i in model.graph.initializer if i.name not in held]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        if not keep_io:
            raise BadInputError("a separable model keeps its swappable tensors FP32; keep_io_types=False is refused.")
    say(f"converting to FP16 (kept in FP32: {', '.join(block)}) ...")
    t0 = time.perf_counter()
    nodes = _fp16_node_block_list(model, f16)
    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(block)),
        node_block_list=nodes,
        max_finite_val=float(f16.get("max_finite_val", 65504.0)),
        min_positive_val=float(f16.get("min_positive_val", 5.96e-08)),
    )
    if held:
        converted.graph.initializer.extend(held.values())
    toposort(converted)  # the converter appends its input casts last; checkers and TensorRT need order
    seconds = {"convert": time.perf_counter() - t0}
    try:
        onnx.checker.check_model(converted, full_check=False)
    except Exception as e:
        raise AtexportError(f"the FP16 model fails onnx.checker ({str(e).splitlines()[0][:300]}); a bug.") from e
    problems = check_fp16_graph(converted, block)
    if problems:
        raise AtexportError(f"the FP16 conversion did not keep the FP32 block list: {'; '.join(problems[:5])} (a bug).")

    report = fp16_report(converted)
    report["recipe"] = f"onnxruntime float16, FP32: {', '.join(block)}" + (f" + {len(nodes)} named nodes" if nodes else "")
    if held:
        report["swappable"] = f"{len(held)} tensors kept FP32 overridable initializers, cast to FP16 in the graph"
    import onnxruntime

    meta.precision = "fp16"
    meta.extra = dict(meta.extra or {})
    meta.extra["precision"] = {
        "precision": "fp16",
        "tool": f"onnxruntime.transformers.float16 (onnxruntime {onnxruntime.__version__})",
        "block_ops": block,
        "block_nodes": nodes,
        "keep_io_types": keep_io,
        "swappable": "fp32 inputs, cast to fp16 in the graph" if held else None,
        "graph": report,
        "source_model": Path(where).name if isinstance(onnx_in, (str, os.PathLike)) else None,
        "config_source": cfg.get("_source"),
    }
    converted.producer_name = src.producer_name
    converted.producer_version = src.producer_version
    converted.doc_string = src.doc_string
    result = PrecisionResult(path=None, precision="fp16", metadata=meta, graph=report, seconds=seconds)
    _finish(converted, meta, out, "fp16", result, verify, src, reference, images, cfg["parity"], say)
    result.seconds["total"] = time.perf_counter() - t_start
    return result


def _fp16_node_block_list(model, f16: dict) -> list[str]:
    """Named nodes kept FP32 by rule: ``adapter_residual: fp32`` keeps the Adds that add an adapter's
    output to the residual stream (``x + up(gelu(down(x)))``) in FP32."""
    if str(f16.get("adapter_residual", "fp16")).lower() != "fp32":
        return []
    prod = _producers(model)
    out = []
    for n in model.graph.node:
        if n.op_type != "Add":
            continue
        for i in n.input:
            p = prod.get(i)
            if p is not None and p.op_type == "Add" and any(".adapter.up." in x for x in p.input):
                out.append(n.name)
                break
    return out


# --------------------------------------------------------------------------------------------------
# INT8
# --------------------------------------------------------------------------------------------------


def _ort_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


class _BatchReader:
    """An ONNX Runtime CalibrationDataReader over a preprocessed batch, in chunks the model accepts."""

    def __init__(self, batch: np.ndarray, input_name: str, chunk: int, fixed: bool):
        self.items = []
        for i in range(0, len(batch), chunk):
            x = batch[i : i + chunk]
            if fixed and len(x) < chunk:  # a fixed-batch model: pad by repeating the last image
                x = np.concatenate([x, np.repeat(x[-1:], chunk - len(x), axis=0)])
            self.items.append({input_name: np.ascontiguousarray(x, dtype=np.float32)})
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def __len__(self):
        return len(self.items)

    def rewind(self):
        self.i = 0


def calibrate(model_path: str, batch: np.ndarray, *, op_types: Sequence[str] | None, method: str,
              symmetric: bool, percentile: float, num_bins: int, num_quantized_bins: int,
              input_name: str, fixed_batch: int | None) -> dict:
    """Run ONNX Runtime's calibrator and return its tensor ranges as a JSON-able document.

    The histogram methods get ``num_bins`` explicitly: ``quantize_static`` cannot pass it, and with the
    default 128 bins (= ``num_quantized_bins``) Entropy silently degenerates to MinMax.
    """
    import json

    from onnxruntime.quantization.calibrate import CalibrationCacheEncoder, create_calibrator

    extra = {"symmetric": bool(symmetric)}
    if method == "percentile":
        extra.update(num_bins=int(num_bins), percentile=float(percentile))
    elif method == "entropy":
        extra.update(num_bins=int(num_bins), num_quantized_bins=int(num_quantized_bins))
    with tempfile.TemporaryDirectory(prefix="atexport-calib-") as tmp:
        calibrator = create_calibrator(
            Path(model_path),
            list(op_types) if op_types else [],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=_ort_method(method),
            extra_options=extra,
        )
        reader = _BatchReader(batch, input_name, fixed_batch or 8, fixed_batch is not None)
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    return json.loads(json.dumps(ranges.to_dict(), cls=CalibrationCacheEncoder))


def _unshare_float_consumers(model, quantized: set[str]) -> int:
    """Give every node that is not a quantized Linear layer its float input back.

    ONNX Runtime's QDQ quantizer replaces *all* consumers of a quantized activation with the
    dequantized tensor, so the residual Add that shares its input with an adapter's down-projection
    would silently read INT8-rounded values. Those consumers are rewired to the float tensor, and Q/DQ
    pairs left without consumers are removed. Returns the number of rewired inputs.
    """
    prod = _producers(model)
    rewired = 0
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.name in quantized:
            continue
        for k, name in enumerate(n.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a quantized weight (initializer -> DQ): leave it
            n.input[k] = q.input[0]
            rewired += 1
    graph_outputs = {o.name for o in model.graph.output}
    for o in list(model.graph.output):
        dq = prod.get(o.name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            raise AtexportError(f"graph output {o.name} is dequantized; the quantizer changed an output (a bug).")
    changed = True
    while changed:  # drop Q/DQ nodes nobody reads any more
        changed = False
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
        keep = [n for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in used for o in n.output)]
        if len(keep) != len(model.graph.node):
            del model.graph.node[:]
            model.graph.node.extend(keep)
            changed = True
    used = {i for n in model.graph.node for i in n.input}
    keep_init = [i for i in model.graph.initializer if i.name in used or i.name in {x.name for x in model.graph.input}]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_init)
    return rewired


def int8_settings(target: str, int8: dict) -> dict:
    """The quantizer settings of a target (``tensorrt`` or ``cpu``) from the ``int8`` config section."""
    if target not in TARGETS:
        raise BadInputError(f"--target {target}: expected one of {TARGETS}.")
    t = dict((int8.get("targets") or {}).get(target) or {})
    return {
        "activation_type": str(t.get("activation_type", "int8")),
        "weight_type": str(t.get("weight_type", "int8")),
        "activation_symmetric": bool(t.get("activation_symmetric", target == "tensorrt")),
        "weight_symmetric": bool(t.get("weight_symmetric", True)),
        "per_channel": bool(t.get("per_channel", True)),
        "reduce_range": bool(t.get("reduce_range", False)),
        "weights_as_qdq_pairs": bool(t.get("weights_as_qdq_pairs", False)),
    }


def quantize_int8(
    onnx_in,
    onnx_out=None,
    calibration="digits",
    *,
    target: str = "tensorrt",
    method: str | None = None,
    op_policy: str = "linear",
    count: int | None = None,
    cache: str | os.PathLike | bool | None = None,
    verify: bool = True,
    reference=None,
    images=None,
    config: str | Mapping = "precision",
    log=None,
) -> PrecisionResult:
    """Quantize an FP32 atexport ONNX model to explicit INT8 (Q/DQ), check parity, write it atomically.

    Args:
        onnx_in: the FP32 model (path or ``onnx.ModelProto``) exported by ``atexport onnx``.
        onnx_out: output path; default ``<stem>.int8.onnx`` beside the input.
        calibration: calibration set: a name in ``calibration/``, a YAML path, a folder of images, a
            :class:`~atexport.export.calibration.CalibrationSet`, or an already preprocessed float32 batch.
        target: ``tensorrt`` (symmetric signed INT8 activations, zero points 0) or ``cpu`` (U8S8, for
            ONNX Runtime's x86 kernels); both quantize the same Linear layers.
        method: calibration method ``minmax``, ``percentile`` or ``entropy`` (default from the preset).
        op_policy: ``linear`` (default: MatMul/Gemm with constant weights only) or ``all`` (every op ONNX
            Runtime can quantize; exists to show why ``linear`` is the default — it is measurably worse).
        count: override the calibration set's image count.
        cache: calibration cache file; default ``<output stem>.calib.json``; ``False`` disables it.
        verify, reference, images, config, log: as in :func:`to_fp16`.

    Raises:
        BadInputError: unreadable input, input without atexport metadata or not FP32, bad options.
        ParityError: outside the int8 tolerance; the model is kept at ``<stem>.failed.onnx``.
    """
    say = log or (lambda *_: None)
    require("onnxruntime", "INT8 quantization (onnxruntime.quantization)", "onnx")
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from atexport.export import calibration as calib

    cfg = load_precision_config(config)
    i8, ccfg = cfg["int8"], cfg["calibration"]
    method = str(method or ccfg.get("method", "minmax")).lower()
    if method not in METHODS:
        raise BadInputError(f"--calib-method {method}: expected one of {METHODS}.")
    if op_policy not in OP_POLICIES:
        raise BadInputError(f"op_policy {op_policy!r}: expected one of {OP_POLICIES}.")
    settings = int8_settings(target, i8)
    t_start = time.perf_counter()
    src, where = _read(onnx_in)
    meta = _metadata(src, where)
    out = _prepare_output(onnx_in, onnx_out, "int8")

    # Which nodes: the Linear layers (constant weights); swappable ones stay float.
    swappable = [e.get("initializer", k) for k, e in (meta.manifest or {}).items()]
    plain, swap_linear = linear_nodes(src, swappable)
    op_types = list(i8.get("op_types", LINEAR_OPS))
    if op_policy == "linear":
        nodes_to_quantize = plain
        calib_ops = op_types
        if not plain:
            raise BadInputError(f"{where}: no MatMul/Gemm layer with a constant weight to quantize.")
    else:
        nodes_to_quantize, calib_ops = None, None

    # Calibration images through the model's own preprocessing.
    t0 = time.perf_counter()
    if isinstance(calibration, np.ndarray):
        batch = np.ascontiguousarray(calibration, dtype=np.float32)
        cs_desc = {"name": "array", "source": "array", "images": int(len(batch))}
    else:
        cs = calib.load_calibration_set(calibration, count=count, min_images=ccfg.get("min_images"))
        say(f"loading calibration images ({cs.name}: {cs.source}, up to {cs.count}) ...")
        batch = cs.batch(meta.preprocess)
        cs_desc = cs.to_dict()
    dsha = calib.data_hash(batch)
    in_batch = meta.input["shape"][0]
    fixed = int(in_batch) if isinstance(in_batch, int) else None
    calib_settings = {
        "method": method,
        "calibrated_ops": calib_ops or "all",
        "symmetric_histogram": settings["activation_symmetric"],
        "percentile": float(ccfg.get("percentile", 99.99)) if method == "percentile" else None,
        "num_bins": int(ccfg.get("num_bins", 2048)) if method != "minmax" else None,
        "num_quantized_bins": int(ccfg.get("num_quantized_bins", 128)) if method == "entropy" else None,
        "onnxruntime": onnxruntime.__version__,
    }
    mhash = calib.model_hash(src)
    key = calib.CacheKey(model_sha256=mhash, data_sha256=dsha, settings=calib_settings)
    cache_path = None if cache is False else Path(cache) if cache not in (None, True) else calib.default_cache_path(out)
    ranges, why = (None, "disabled") if cache_path is None else calib.read_cache(cache_path, key)
    seconds = {"load_images": time.perf_counter() - t0}

    with tempfile.TemporaryDirectory(prefix="atexport-int8-") as tmp:
        model_path = Path(tmp) / "fp32.onnx"
        onnx.save(src, str(model_path))
        t0 = time.perf_counter()
        if ranges is None:
            say(f"calibrating ({method}, {len(batch)} images; cache: {why}) ...")
            with _quiet_ort_quantization():
                ranges = calibrate(
                    str(model_path), batch, op_types=calib_ops, method=method,
                    symmetric=settings["activation_symmetric"],
                    percentile=float(ccfg.get("percentile", 99.99)), num_bins=int(ccfg.get("num_bins", 2048)),
                    num_quantized_bins=int(ccfg.get("num_quantized_bins", 128)),
                    input_name=meta.input.get("name", "input"), fixed_batch=fixed,
                )
            status = "computed"
            seconds["calibrate"] = time.perf_counter() - t0
            if cache_path is not None:
                calib.write_cache(cache_path, key, ranges, cs_desc, seconds["calibrate"])
                status = f"computed ({why}), saved"
        else:
            status = "reused"
            say(f"reusing calibration cache {cache_path} ({why}) ...")
        ort_cache = Path(tmp) / "ranges.json"
        import json

        ort_cache.write_text(json.dumps({**ranges, "smooth_quant": False}))
        qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        extra = {
            "ActivationSymmetric": settings["activation_symmetric"],
            "WeightSymmetric": settings["weight_symmetric"],
            "AddQDQPairToWeight": settings["weights_as_qdq_pairs"],
        }
        if op_policy == "linear":
            # Inputs and weights only: no Q/DQ on the layer's output, none on its bias (TensorRT fuses
            # DQ -> MatMul -> bias Add itself and has no INT32 bias dequantization).
            extra.update({"OpTypesToExcludeOutputQuantization": list(LINEAR_OPS), "QuantizeBias": False,
                          "MatMulConstBOnly": True})
        qpath = Path(tmp) / "int8.onnx"
        t0 = time.perf_counter()
        with _quiet_ort_quantization():
            quantize_static(
                str(model_path), str(qpath), None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types if op_policy == "linear" else None,
                per_channel=settings["per_channel"],
                reduce_range=settings["reduce_range"],
                activation_type=qtype[settings["activation_type"]],
                weight_type=qtype[settings["weight_type"]],
                nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=swap_linear,
                calibrate_method=_ort_method(method),
                extra_options=extra,
                calibration_cache_path=str(ort_cache),
            )
        model = onnx.load(str(qpath))
    rewired = _unshare_float_consumers(model, set(plain)) if op_policy == "linear" else 0
    seconds["quantize"] = time.perf_counter() - t0
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as e:
        raise AtexportError(f"the INT8 model fails onnx.checker ({str(e).splitlines()[0][:300]}); a bug.") from e
    if op_policy == "linear":
        problems = check_int8_graph(model, LINEAR_OPS, symmetric=target == "tensorrt")
        if problems:
            raise AtexportError(f"the INT8 model breaks the Linear-only Q/DQ policy: {'; '.join(problems[:5])} (a bug).")
    if swappable:
        from atexport.export.onnx import check_manifest

        check_manifest(model, meta.manifest, "INT8 model")

    rep = qdq_report(model)
    report = {
        "recipe": f"onnxruntime QDQ, {op_policy} ops, target {target}, "
                  f"{'S8S8' if settings['activation_type'] == 'int8' else 'U8S8'}, "
                  f"{'per-channel' if settings['per_channel'] else 'per-tensor'} weights",
        "qdq": rep,
        "linear_layers": len(plain),
        "rewired_float_consumers": rewired,
    }
    if swap_linear:
        report["swappable"] = f"{len(swap_linear)} layers using swappable tensors kept float (tensors FP32)"
    calibration_info = dict(cs_desc)
    calibration_info.update(images=int(len(batch)), data_sha256=dsha, method=method, cache=str(cache_path) if cache_path else None,
                            cache_status=status)
    meta.precision = "int8"
    meta.extra = dict(meta.extra or {})
    meta.extra["precision"] = {
        "precision": "int8",
        "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {onnxruntime.__version__})",
        "target": target,
        "op_policy": op_policy,
        "settings": settings,
        "calibration": {k: v for k, v in calibration_info.items() if k != "cache_status"},
        "calibration_settings": calib_settings,
        "model_sha256": mhash,
        "swappable": "layers using them kept float; tensors FP32" if swap_linear else None,
        "graph": report,
        "config_source": cfg.get("_source"),
    }
    model.producer_name = src.producer_name
    model.producer_version = src.producer_version
    model.doc_string = src.doc_string
    result = PrecisionResult(path=None, precision="int8", metadata=meta, graph=report, calibration=calibration_info, seconds=seconds)
    _finish(model, meta, out, "int8", result, verify, src, reference, images, cfg["parity"], say)
    result.seconds["total"] = time.perf_counter() - t_start
    return result


def convert_precision(onnx_in, precision: str, onnx_out=None, *, calibration=None, **kwargs) -> PrecisionResult:
    """Dispatch to :func:`to_fp16` or :func:`quantize_int8` (``fp32`` is refused: nothing to convert)."""
    if precision == "fp16":
        return to_fp16(onnx_in, onnx_out, **kwargs)
    if precision == "int8":
        if calibration is None:
            raise BadInputError("INT8 needs calibration images: --calib NAME (a set in calibration/) or --calib DIR.")
        return quantize_int8(onnx_in, onnx_out, calibration, **kwargs)
    raise BadInputError(f"--precision {precision}: expected fp16 or int8 for a precision model.")
