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
* Mixed INT8 (``keep_float``): the Linear layers whose quantization moves the logits most stay float
  MatMul/Gemm in the file (:func:`layer_sensitivity` scores each layer by the relative logit error on
  calibration images, :func:`choose_keep_float` picks how many within a share of the Linear
  multiply-adds); or the user names them (:func:`layer_names`: ``blocks.3.block.mlp.fc2``, ``head``).
  The ranking is cached beside the calibration ranges and the choice is recorded in the metadata.

Separable models (swappable adapter and head tensors, listed in the metadata ``manifest``): the
swappable tensors stay FP32 overridable initializers in both conversions (FP16 casts them inside the
graph; INT8 leaves the layers that use them unquantized), so ``atexport swap`` works unchanged.

Graph inspection helpers (:func:`float_types_by_node`, :func:`fp16_report`, :func:`qdq_report`,
:func:`check_fp16_graph`, :func:`check_int8_graph`) are what the tests and the CLI use to show that
the policy was applied.
"""

from __future__ import annotations

import contextlib
import io
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
from atexport.export.multitask import task_input

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
            kf = g.get("kept_float")
            if kf:
                shown = ", ".join(kf["layers"][:8]) + (f" and {len(kf['layers']) - 8} more" if len(kf["layers"]) > 8 else "")
                lines.append(f"float:      {len(kf['layers'])} Linear layers ({kf['requested']}; "
                             f"{kf['float_share']:.1%} of Linear MACs){': ' + shown if shown else ''}")
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
        pairs = [("", ref, cand)]
        if task_input(meta):  # multi-task model: every task on its own (its task_id fed, its logits only)
            from atexport.export.multitask import task_runners

            pairs = [(f" {t['name']}", r, c) for (t, r), (_, c) in zip(task_runners(meta, ref), task_runners(meta, cand))]
        rows = []
        for suffix, r, c in pairs:
            rows += check_parity(
                r, c, photos, precision,
                random_inputs=_per_precision(par.get("random_inputs", 0), precision),
                input_shape=in_shape, seed=int(par.get("seed", 0)), batch_sizes=sizes,
                tolerances=par.get("tolerances", "tolerances"), label=precision + suffix,
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

    def __init__(self, batch: np.ndarray, input_name: str, chunk: int, fixed: bool, tasks: tuple | None = None):
        self.items = []
        for i in range(0, len(batch), chunk):
            x = batch[i : i + chunk]
            if fixed and len(x) < chunk:  # a fixed-batch model: pad by repeating the last image
                x = np.concatenate([x, np.repeat(x[-1:], chunk - len(x), axis=0)])
            item = {input_name: np.ascontiguousarray(x, dtype=np.float32)}
            if tasks:  # multi-task model (task input name, K): tasks round-robin, every task's adapters calibrated
                item[tasks[0]] = ((np.arange(len(x)) + i) % tasks[1]).astype(np.int64)
            self.items.append(item)
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

    def done(self) -> bool:
        return self.i >= len(self.items)


class _Slice:
    """At most ``n`` more items of a reader: ONNX Runtime's calibrators hold every intermediate output of
    one ``collect_data`` call in memory (and the histogram ones copy them again), so atexport feeds them
    a slice at a time; the collected ranges and histograms merge across calls."""

    def __init__(self, reader: _BatchReader, n: int):
        self.reader, self.left = reader, n

    def get_next(self):
        if self.left <= 0:
            return None
        self.left -= 1
        return self.reader.get_next()


def calibrate(model_path: str, batch: np.ndarray, *, op_types: Sequence[str] | None, method: str,
              symmetric: bool, percentile: float, num_bins: int, num_quantized_bins: int,
              input_name: str, fixed_batch: int | None, tasks: tuple | None = None,
              collect_images: int = 32) -> dict:
    """Run ONNX Runtime's calibrator and return its tensor ranges as a JSON-able document.

    The histogram methods get ``num_bins`` explicitly: ``quantize_static`` cannot pass it, and with the
    default 128 bins (= ``num_quantized_bins``) Entropy silently degenerates to MinMax. Images are fed
    ``collect_images`` at a time (see :class:`_Slice`): in one call, percentile calibration of vit_small
    at 224 px on 256 images held over 22 GB and was killed for memory on a 24 GB machine.
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
        chunk = fixed_batch or 8
        reader = _BatchReader(batch, input_name, chunk, fixed_batch is not None, tasks)
        per_call = max(1, int(collect_images) // chunk)
        # The histogram calibrators print progress ("Collecting tensor data ...") to stdout; keep the
        # command's stdout for its results.
        with contextlib.redirect_stdout(io.StringIO()):
            while not reader.done():
                calibrator.collect_data(_Slice(reader, per_call))
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
    for o in list(model.graph.output):
        dq = prod.get(o.name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            raise AtexportError(f"graph output {o.name} is dequantized; the quantizer changed an output (a bug).")
    _prune_qdq(model)
    return rewired


def _prune_qdq(model) -> None:
    """Remove Q/DQ nodes nobody reads any more, then initializers nobody reads (graph inputs stay)."""
    graph_outputs = {o.name for o in model.graph.output}
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


# --------------------------------------------------------------------------------------------------
# INT8 mixed precision: the Linear layers whose quantization costs the most stay float
# --------------------------------------------------------------------------------------------------

SENSITIVITY_MODES = ("leave_one_out", "only")
_ACTIVATION_PASSTHROUGH = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast",
                           "QuantizeLinear", "DequantizeLinear")
_GELU_OPS = ("Gelu", "FastGelu", "BiasGelu", "Mul")


def _weight_kn(node, prod: dict, inits: dict) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a Linear node, from its weight initializer's shape."""
    name, transposed = node.input[1], False
    for _ in range(8):
        if name in inits:
            break
        p = prod.get(name)
        if p is None or p.op_type not in _WEIGHT_PASSTHROUGH:
            return None
        transposed ^= p.op_type == "Transpose"
        name = p.input[0]
    else:
        return None
    dims = [int(d) for d in inits[name].dims]
    if len(dims) != 2:
        return None
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        transposed = not transposed
    return (dims[1], dims[0]) if transposed else (dims[0], dims[1])


def _activation_source(name: str, prod: dict) -> str | None:
    """The op type that made a Linear layer's input, looking through reshapes, casts and Q/DQ."""
    for _ in range(8):
        p = prod.get(name)
        if p is None:
            return None
        if p.op_type not in _ACTIVATION_PASSTHROUGH:
            return p.op_type
        name = p.input[0]
    return None


def _feeds_output(node, cons: dict, outputs: set) -> bool:
    """Whether a node's output is a graph output, directly or through a bias Add / reshape."""
    frontier = list(node.output)
    for _ in range(3):
        if any(t in outputs for t in frontier):
            return True
        frontier = [o for t in frontier for c in cons.get(t, ()) if c.op_type in ("Add", "Reshape", "Identity", "Flatten")
                    for o in c.output]
    return any(t in outputs for t in frontier)


def layer_names(model) -> dict[str, str]:
    """Linear node name -> its PyTorch module name (``blocks.3.block.mlp.fc2``, ``blocks.3.adapter.up``, ``head``).

    The exporter names nodes ``node_MatMul_73`` and folds weight transposes into unnamed constants, so the
    names are read off the graph's structure, in graph order: a block starts at the Linear that a
    LayerNormalization feeds and that is 3x wider than its input (``attn.qkv``); then ``attn.proj``
    (square), ``mlp.fc1`` (fed by LayerNormalization, wider), ``mlp.fc2`` (fed by GELU, narrower),
    ``adapter.down`` (narrower, not fed by GELU) and ``adapter.up`` (fed by GELU, wider); the Linear that
    makes the graph output is ``head``. A layer the rules do not place, or whose name would repeat, keeps
    its node name. Names are for people (reports, ``--int8-keep-float``); node names always work too.
    """
    g = model.graph
    prod, cons = _producers(model), _consumers(model)
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    placed, block = [], -1
    for n in g.node:
        if n.op_type not in LINEAR_OPS or len(n.input) < 2:
            continue
        kn = _weight_kn(n, prod, inits)
        if kn is None:
            continue  # activation x activation (attention): not a Linear layer
        k, m = kn
        src = _activation_source(n.input[0], prod)
        role = None
        if _feeds_output(n, cons, outputs):
            role = "head"
        elif src == "LayerNormalization" and m == 3 * k:
            block, role = block + 1, "attn.qkv"
        elif src == "LayerNormalization" and m > k:
            role = "mlp.fc1"
        elif src in _GELU_OPS and k > m:
            role = "mlp.fc2"
        elif src in _GELU_OPS and k < m:
            role = "adapter.up"
        elif m < k:
            role = "adapter.down"
        elif m == k:
            role = "attn.proj"
        placed.append((n.name, block, role))
    adapters = any(r and r.startswith("adapter.") for _, _, r in placed)
    names = {}
    for node, b, role in placed:
        if role == "head":
            names[node] = "head"
        elif role is None or b < 0:
            names[node] = node
        else:
            inner = "block." if adapters and not role.startswith("adapter.") else ""
            names[node] = f"blocks.{b}.{inner}{role}"
    counts = Counter(names.values())
    return {node: (name if counts[name] == 1 else node) for node, name in names.items()}


def parse_keep_float(value) -> tuple[str, Any]:
    """Read a keep-float request: ``("none", None)``, ``("auto", None)``, ``("count", N)`` or ``("layers", [...])``.

    Accepts ``none``/``0``/``False``, ``auto``, an integer N (the N most sensitive layers), or layer names and
    globs as a list or a comma-separated string (``"head,*.mlp.fc2"``).
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return "none", None
    if isinstance(value, bool):
        raise BadInputError("keep-float: give none, auto, a number of layers or layer names, not true.")
    if isinstance(value, int):
        if value < 0:
            raise BadInputError(f"--int8-keep-float {value}: a number of layers must be 0 or more.")
        return ("none", None) if value == 0 else ("count", value)
    if isinstance(value, str):
        v = value.strip()
        if v.lower() == "auto":
            return "auto", None
        if v.isdigit():
            return parse_keep_float(int(v))
        value = [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return "layers", list(value)
    raise BadInputError(f"keep-float {value!r}: expected none, auto, a number of layers, or layer names.")


def select_layers(patterns: Sequence[str], names: Mapping[str, str]) -> list[str]:
    """Node names (in graph order) of the layers that ``patterns`` name: module names
    (``blocks.11.block.mlp.fc2``), globs over them (``*.mlp.fc2``, ``head``) or ONNX node names.

    Args:
        patterns: names or globs.
        names: node name -> module name of the layers that can be kept float (:func:`layer_names`).
    """
    import fnmatch

    out: list[str] = []
    for pat in patterns:
        hit = [node for node, name in names.items() if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(node, pat)]
        if not hit:
            examples = ", ".join(list(dict.fromkeys(names.values()))[:4])
            raise BadInputError(
                f"--int8-keep-float {pat}: no quantized Linear layer has that name; layers are named like {examples} "
                "(globs such as '*.mlp.fc2' work, and so do ONNX node names)."
            )
        out.extend(h for h in hit if h not in out)
    order = list(names)
    return sorted(out, key=order.index)


def keep_layers_float(qmodel, src, nodes: Sequence[str]) -> int:
    """Take Linear layers of an INT8 model back to float, in place.

    Each named layer reads its float activation and its FP32 weight (copied from ``src``, the FP32 model the
    INT8 one was made from) again; Q/DQ nodes and quantized weights nobody reads any more are removed, so a
    kept layer is an ordinary float MatMul/Gemm in the file TensorRT builds. Returns the inputs rewired.
    """
    nodes = set(nodes)
    if not nodes:
        return 0
    prod = _producers(qmodel)
    src_nodes = {n.name: n for n in src.graph.node}
    src_inits = {i.name: i for i in src.graph.initializer}
    have = ({i.name for i in qmodel.graph.initializer} | {i.name for i in qmodel.graph.input}
            | {o for n in qmodel.graph.node for o in n.output})
    rewired, found = 0, set()
    for n in qmodel.graph.node:
        if n.name not in nodes:
            continue
        found.add(n.name)
        orig = src_nodes.get(n.name)
        if orig is None or orig.op_type != n.op_type:
            raise AtexportError(f"layer {n.name} is not in the FP32 model the INT8 model was made from (a bug).")
        for k, name in enumerate(n.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            float_name = orig.input[k]
            if float_name not in have:
                if float_name not in src_inits:
                    raise AtexportError(f"the FP32 input {float_name} of layer {n.name} is missing (a bug).")
                qmodel.graph.initializer.append(src_inits[float_name])
                have.add(float_name)
            n.input[k] = float_name
            rewired += 1
    missing = nodes - found
    if missing:
        raise AtexportError(f"layers {sorted(missing)[:3]} are not in the INT8 model (a bug).")
    _prune_qdq(qmodel)
    return rewired


def logit_error(reference: np.ndarray, logits: np.ndarray) -> dict:
    """How far a model's logits are from the reference's: relative error and top-1 agreement.

    ``rel_error`` is ``||d|| / ||r||`` with ``d`` and ``r`` the error and the reference centred per row (a
    per-image constant shift changes no prediction), over all images and classes.
    """
    r = reference - reference.mean(1, keepdims=True)
    d = logits - reference
    d = d - d.mean(1, keepdims=True)
    return {
        "rel_error": float(np.linalg.norm(d) / max(float(np.linalg.norm(r)), 1e-12)),
        "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
    }


def _infer_batch(model, x: np.ndarray, fixed: int | None, chunk: int = 16, tasks: tuple | None = None) -> np.ndarray:
    """Logits of an ONNX model (proto or bytes) on ``x``, in chunks the model accepts (padded if fixed);
    a multi-task model (``tasks``: task input name, K) gets its tasks round-robin, as in calibration."""
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    data = model if isinstance(model, bytes) else model.SerializeToString()
    size = fixed or chunk
    out = []
    with OnnxRuntimeRunner(data, name="int8-probe") as r:
        for i in range(0, len(x), size):
            c = x[i : i + size]
            n = len(c)
            if fixed and n < fixed:
                c = np.concatenate([c, np.repeat(c[-1:], fixed - n, axis=0)])
            feeds = {tasks[0]: ((np.arange(len(c)) + i) % tasks[1]).astype(np.int64)} if tasks else {}
            out.append(r.infer(np.ascontiguousarray(c, dtype=np.float32), **feeds)[:n])
    return np.concatenate(out)


def _variant(qmodel, src, keep: Sequence[str]):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(qmodel)
    keep_layers_float(m, src, keep)
    return m


def layer_sensitivity(qmodel, src, nodes: Sequence[str], x: np.ndarray, reference: np.ndarray, *,
                      mode: str = "leave_one_out", fixed: int | None = None, tasks: tuple | None = None,
                      say=None) -> dict:
    """Quantization sensitivity of each Linear layer, scored by the logit error on images ``x``.

    ``leave_one_out``: the INT8 model with that one layer in float; the score is how much the relative logit
    error drops (positive: keeping it float helps). ``only``: the FP32 model with only that layer quantized;
    the score is its relative logit error. Either way, higher is more sensitive.

    Returns:
        ``{"mode", "images", "base": logit_error of the full INT8 model, "scores": {node: score}}``.
    """
    if mode not in SENSITIVITY_MODES:
        raise BadInputError(f"sensitivity mode {mode!r}: expected one of {SENSITIVITY_MODES}.")
    say = say or (lambda *_: None)
    base = logit_error(reference, _infer_batch(qmodel, x, fixed, tasks=tasks))
    scores = {}
    t0 = time.perf_counter()
    for i, node in enumerate(nodes):
        keep = [node] if mode == "leave_one_out" else [n for n in nodes if n != node]
        err = logit_error(reference, _infer_batch(_variant(qmodel, src, keep), x, fixed, tasks=tasks))["rel_error"]
        scores[node] = base["rel_error"] - err if mode == "leave_one_out" else err
        if i == 0 or (i + 1) % 16 == 0:
            say(f"  sensitivity {i + 1}/{len(nodes)} layers ({time.perf_counter() - t0:.0f}s)")
    return {"mode": mode, "images": int(len(x)), "base": base, "scores": scores}


def _linear_costs(model, nodes: Sequence[str]) -> dict[str, int]:
    """Multiply-adds per token of each Linear layer (its weight's element count)."""
    prod = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    out = {}
    for node in nodes:
        kn = _weight_kn(by_name[node], prod, inits)
        out[node] = int(kn[0] * kn[1]) if kn else 0
    return out


RANK_BY = ("sensitivity", "per_cost")


def rank_layers(sensitivity: dict, costs: Mapping[str, int], rank_by: str = "sensitivity") -> list[str]:
    """Layers with a positive score, best candidates for float first: by score (``sensitivity``) or by
    score per multiply-add (``per_cost``: the error a layer removes for the latency it costs)."""
    if rank_by not in RANK_BY:
        raise BadInputError(f"int8.keep_float.rank_by {rank_by!r}: expected one of {RANK_BY}.")
    scores = sensitivity["scores"]
    key = (lambda n: -scores[n]) if rank_by == "sensitivity" else (lambda n: -scores[n] / max(costs.get(n, 1), 1))
    return sorted((n for n, s in scores.items() if s > 0), key=key)


def choose_keep_float(qmodel, src, sensitivity: dict, costs: Mapping[str, int], x: np.ndarray, reference: np.ndarray, *,
                      max_share: float, slack: float, rank_by: str = "sensitivity", fixed: int | None = None,
                      tasks: tuple | None = None) -> tuple[list[str], list[dict]]:
    """``auto``: which layers to keep float, by measured logit error.

    Candidates are the layers with a positive score in :func:`rank_layers` order, as long as the float
    layers' share of the Linear multiply-adds stays within ``max_share`` (the latency budget). The INT8
    model with the first k of them in float is scored for k = 0, 1, 2, 3, 4, 6, 8, 12, 16, ...; the choice
    is the smallest k that removes all but ``slack`` (a fraction) of the largest error reduction measured:
    ``err(k) <= best + slack * (err(0) - best)``, so layers that buy almost nothing stay INT8.

    Returns:
        the chosen node names and the trace (``k``, ``rel_error``, ``top1_agreement``, ``float_share``).
    """
    total = max(sum(costs.values()), 1)
    ranked = rank_layers(sensitivity, costs, rank_by)
    order, used = [], 0
    for n in ranked:
        if used + costs.get(n, 0) <= max_share * total:
            order.append(n)
            used += costs.get(n, 0)
    ks = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96) if k < len(order)] + ([len(order)] if order else [])
    trace = [{"k": 0, **sensitivity["base"], "float_share": 0.0}]
    for k in ks:
        err = logit_error(reference, _infer_batch(_variant(qmodel, src, order[:k]), x, fixed, tasks=tasks))
        trace.append({"k": k, **err, "float_share": sum(costs.get(n, 0) for n in order[:k]) / total})
    best = min(t["rel_error"] for t in trace)
    bar = best + slack * (trace[0]["rel_error"] - best)
    pick = next(t for t in trace if t["rel_error"] <= bar)
    return order[: pick["k"]], trace


def _keep_float_layers(model, src, plain: Sequence[str], kind: str, value, kf: Mapping, batch: np.ndarray, *,
                       fixed: int | None, tasks: tuple | None, cache_path, cache_key, quant_settings: dict, say) -> dict:
    """Apply a keep-float request to the INT8 ``model`` in place; returns what goes into the metadata."""
    from atexport.export import calibration as calib

    names = layer_names(src)
    names = {n: names.get(n, n) for n in plain}
    costs = _linear_costs(src, plain)
    total = max(sum(costs.values()), 1)
    info: dict[str, Any] = {"requested": ",".join(value) if kind == "layers" else str(value) if kind == "count" else kind}
    if kind == "layers":
        keep = select_layers(value, names)
    else:
        mode = str(kf.get("sensitivity", "only"))
        n_img = int(kf.get("images", 32))
        x = batch[: max(1, n_img)]
        sens_settings = {"mode": mode, "images": int(len(x)), "quantizer": quant_settings, "metric": "rel_error"}
        sens, status = None, "disabled"
        if cache_path is not None:
            sens, status = calib.read_sensitivity(cache_path, cache_key, sens_settings)
        reference = _infer_batch(src, x, fixed, tasks=tasks)
        if sens is None:
            say(f"measuring the quantization sensitivity of {len(plain)} Linear layers ({mode}, {len(x)} images) ...")
            sens = layer_sensitivity(model, src, plain, x, reference, mode=mode, fixed=fixed, tasks=tasks, say=say)
            if cache_path is not None and calib.write_sensitivity(cache_path, cache_key, sens_settings, sens):
                status = f"computed ({status}), saved"
            else:
                status = f"computed ({status})"
        else:
            status = "reused"
        ranked = sorted(plain, key=lambda n: -float(sens["scores"].get(n, 0.0)))
        rank_by = str(kf.get("rank_by", "sensitivity"))
        info["sensitivity"] = {
            "mode": mode, "images": int(len(x)), "metric": "relative logit error", "cache_status": status,
            "int8_rel_error": sens["base"]["rel_error"], "int8_top1_agreement": sens["base"]["top1_agreement"],
            "ranking": [{"layer": names[n], "score": round(float(sens["scores"].get(n, 0.0)), 6)} for n in ranked],
        }
        if kind == "count":
            keep = ranked[:value]  # the N most sensitive, whatever they cost
        else:
            keep, trace = choose_keep_float(
                model, src, sens, costs, x, reference, max_share=float(kf.get("max_share", 0.1)),
                slack=float(kf.get("slack", 0.1)), rank_by=rank_by, fixed=fixed, tasks=tasks)
            info["auto"] = {"max_share": float(kf.get("max_share", 0.1)), "slack": float(kf.get("slack", 0.1)),
                            "rank_by": rank_by,
                            "trace": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.items()} for t in trace]}
        keep = [n for n in plain if n in set(keep)]  # graph order
    keep_layers_float(model, src, keep)
    info["layers"] = [names[n] for n in keep]
    info["nodes"] = list(keep)
    info["float_share"] = round(sum(costs[n] for n in keep) / total, 6)
    return info


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
    keep_float=None,
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
        keep_float: Linear layers left in float (no Q/DQ): ``"none"``, ``"auto"`` (the most sensitive layers
            while the logit error keeps dropping, within a share of the Linear multiply-adds), an integer N
            (the N most sensitive layers), or layer names/globs (``["head", "*.adapter.*"]``, see
            :func:`layer_names`). Sensitivity is each layer's effect on the logit error on calibration
            images (:func:`layer_sensitivity`), cached with the calibration. Default from the preset
            (``int8.keep_float``).
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
    kf_cfg = dict(i8.get("keep_float") or {})
    kf_kind, kf_value = parse_keep_float(kf_cfg.get("layers", "none") if keep_float is None else keep_float)
    if op_policy != "linear" and kf_kind != "none":
        if keep_float is not None:
            raise BadInputError("keep-float layers apply to the Linear-only policy; op_policy 'all' quantizes every op.")
        kf_kind, kf_value = "none", None  # the preset's default is for the Linear-only policy
    if str(kf_cfg.get("sensitivity", "only")) not in SENSITIVITY_MODES:
        raise BadInputError(f"int8.keep_float.sensitivity {kf_cfg.get('sensitivity')!r}: expected one of {SENSITIVITY_MODES}.")
    if str(kf_cfg.get("rank_by", "sensitivity")) not in RANK_BY:
        raise BadInputError(f"int8.keep_float.rank_by {kf_cfg.get('rank_by')!r}: expected one of {RANK_BY}.")
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
        "collect_images": int(ccfg.get("collect_images", 32)) if method != "minmax" else None,
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
                    input_name=meta.input.get("name", "input"), fixed_batch=fixed, tasks=task_input(meta),
                    collect_images=int(ccfg.get("collect_images", 32)),
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
    kf_info = None
    if kf_kind != "none":
        t0 = time.perf_counter()
        kf_info = _keep_float_layers(
            model, src, plain, kf_kind, kf_value, kf_cfg, batch, fixed=fixed, tasks=task_input(meta),
            cache_path=cache_path, cache_key=key, quant_settings=settings, say=say)
        seconds["keep_float"] = time.perf_counter() - t0
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
    if kf_info is not None:
        report["kept_float"] = {"layers": kf_info["layers"], "float_share": kf_info["float_share"],
                                "requested": kf_info["requested"]}
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
        "keep_float": kf_info,
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
