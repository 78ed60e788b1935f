"""Reading an ONNX graph: which float type each node computes in, where Q/DQ nodes sit, the Linear layers.

These are the checks that show a precision policy was applied (the tests and ``atexport trt`` use them):
:func:`fp16_report` / :func:`check_fp16_graph` for FP16 (LayerNorm and Softmax stay FP32),
:func:`qdq_report` / :func:`check_int8_graph` for INT8 (Q/DQ only around the Linear layers, symmetric
for TensorRT), :func:`linear_nodes` and :func:`layer_names` for the Linear layers and their PyTorch module
names, and two small graph edits the conversions need (:func:`toposort`, :func:`prune_qdq`).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from atexport.errors import AtexportError
from atexport.export.precision.common import LINEAR_OPS

# Ops that only move or reshape a weight between its initializer and the layer that uses it.
WEIGHT_PASSTHROUGH = ("Transpose", "Cast", "Reshape", "Identity", "Unsqueeze", "Squeeze")
_ACTIVATION_PASSTHROUGH = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast",
                           "QuantizeLinear", "DequantizeLinear")
_GELU_OPS = ("Gelu", "FastGelu", "BiasGelu", "Mul")

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


def producers(model) -> dict:
    """Tensor name -> the node that makes it."""
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
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

    prod = producers(model)
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
        if node is None or node.op_type not in WEIGHT_PASSTHROUGH or seen > 8:
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
    prod = producers(model)
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


def weight_kn(node, prod: dict, inits: dict) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a Linear node, from its weight initializer's shape."""
    name, transposed = node.input[1], False
    for _ in range(8):
        if name in inits:
            break
        p = prod.get(name)
        if p is None or p.op_type not in WEIGHT_PASSTHROUGH:
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
    prod, cons = producers(model), consumers(model)
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    placed, block = [], -1
    for n in g.node:
        if n.op_type not in LINEAR_OPS or len(n.input) < 2:
            continue
        kn = weight_kn(n, prod, inits)
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


def prune_qdq(model) -> None:
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
