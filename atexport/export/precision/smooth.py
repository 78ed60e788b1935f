"""SmoothQuant-style migration of activation outliers into the weights, folded into LayerNorm and Linear.

Pretrained ViTs carry massive activations in a few channels of the LayerNorm outputs that feed ``qkv``
and ``fc1`` (tens of times larger than the rest). One per-tensor INT8 scale for such an input spends its
256 levels on the outliers and rounds every other channel to a handful of steps. SmoothQuant (Xiao et
al., 2023) divides each input channel ``j`` by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and
multiplies the matching weight row by it: ``(X / s) (diag(s) W) = X W``. Here ``X`` is a LayerNorm's
output, so the division folds into the LayerNorm's gain and bias and the model stays exact in FP32 (up
to rounding), with no new node for TensorRT or OpenVINO to fuse.

A LayerNorm is smoothed only where it helps and where the fold is exact: its output channels are uneven
(the largest per-channel absolute maximum is at least ``min_ratio`` times their median, measured on the
calibration images), every consumer is a Linear layer with a constant weight, and none of those weights
is swappable (a task swap would bring unscaled weights). Which LayerNorms were smoothed, with their
ratios, and which were passed over and why, goes into the export summary and the metadata.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from atexport.errors import BadInputError

CHUNK = 16


def _weight_rows(node, inits) -> tuple[str, int] | None:
    """``(initializer name, axis of the input channels)`` of a Linear node's constant weight, or None."""
    if len(node.input) < 2 or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return node.input[1], 0
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        return node.input[1], 1 if attrs.get("transB", 0) else 0
    return None


def candidates(model, swappable: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """LayerNorms whose output can be smoothed exactly, and those that cannot (with the reason)."""
    from atexport.export.precision.inspect import layer_names

    inits = {i.name: i for i in model.graph.initializer}
    cons: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    names = layer_names(model)
    ok, skipped = [], []
    for n in model.graph.node:
        if n.op_type != "LayerNormalization":
            continue
        users = cons.get(n.output[0], [])
        why = None
        if len(n.input) < 3 or any(i not in inits for i in n.input[1:3]):
            why = "its gain and bias are not constants"
        elif not users or n.output[0] in outputs:
            why = "its output is not read by Linear layers only"
        rows = []
        for u in users if why is None else []:
            w = _weight_rows(u, inits) if u.op_type in ("MatMul", "Gemm") and u.input[0] == n.output[0] else None
            if w is None:
                why = f"its output also feeds {u.op_type} {u.name}, which cannot absorb the scale"
                break
            if w[0] in swappable:
                why = f"{names.get(u.name, u.name)} has a swappable weight"
                break
            rows.append((u.name, *w))
        entry = {"node": n.name, "layer": _norm_name(n, users, names), "output": n.output[0], "consumers": rows}
        (skipped if why else ok).append({**entry, "reason": why} if why else entry)
    return ok, skipped


def _norm_name(node, users, names: dict) -> str:
    """A LayerNorm's PyTorch name, read off the Linear layer it feeds (``...attn.qkv`` -> ``...norm1``)."""
    for u in users:
        name = names.get(u.name, "")
        for linear, norm in (("attn.qkv", "norm1"), ("mlp.fc1", "norm2")):
            if name.endswith(linear):
                return name[: -len(linear)] + norm
        if name == "head":
            return "norm (before head)"
    return node.name


def _own(model, node, k: int):
    """The initializer at ``node.input[k]``, first copied under a new name if any other input uses it
    (simplifiers merge equal constants: every LayerNorm of a random-init ViT shares one gain of ones)."""
    name = node.input[k]
    users = sum(1 for n in model.graph.node for i in n.input if i == name)
    init = next(i for i in model.graph.initializer if i.name == name)
    if users == 1:
        return init
    copy = model.graph.initializer.add()
    copy.CopyFrom(init)
    copy.name = f"{name}__smooth_{node.name}"
    node.input[k] = copy.name
    return copy


def channel_absmax(model, tensors: list[str], batch: np.ndarray, *, fixed: int | None = None,
                   tasks: tuple | None = None) -> dict[str, np.ndarray]:
    """Per-channel (last axis) absolute maxima of ``tensors`` over ``batch`` in ONNX Runtime."""
    from atexport.artifact.bank import mixed_task_ids
    from atexport.artifact.onnx import with_outputs
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    out = {t: None for t in tensors}
    step = fixed or CHUNK
    with OnnxRuntimeRunner(with_outputs(model, tensors).SerializeToString(), name="smooth-stats") as r:
        for s in range(0, len(batch), step):
            x = np.ascontiguousarray(batch[s : s + step], np.float32)
            n = len(x)
            if fixed and n < fixed:
                x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
            feeds = {tasks[0]: mixed_task_ids(len(x), tasks[1], offset=s)} if tasks else {}
            res = r.run(x, output_names=tensors, **feeds)
            for t in tensors:
                a = np.abs(np.asarray(res[t], np.float32)[:n]).reshape(-1, np.shape(res[t])[-1]).max(axis=0)
                out[t] = a if out[t] is None else np.maximum(out[t], a)
    return out


def smooth_model(model, batch: np.ndarray, *, alpha: float = 0.5, min_ratio: float = 8.0,
                 swappable: Sequence[str] = (), fixed: int | None = None, tasks: tuple | None = None):
    """A smoothed copy of the FP32 ``model`` and the report of what was smoothed and what was not.

    Args:
        model: the FP32 ``onnx.ModelProto`` (left unchanged).
        batch: the calibration images (preprocessed).
        alpha: migration strength, 0 (none) to 1 (all of the activation's range into the weights).
        min_ratio: smooth a LayerNorm only where its largest channel maximum is this many times the median.
        swappable: initializer names that a task swap replaces (their layers are never rescaled).
        fixed: the model's fixed batch size, if any.
        tasks: a multi-task model's ``(task input, number of tasks)``.

    Returns:
        ``(smoothed model, {"alpha", "min_ratio", "smoothed": [...], "skipped": [...]})``.
    """
    import onnx
    from onnx import numpy_helper

    if not 0.0 <= float(alpha) <= 1.0:
        raise BadInputError(f"--int8-smooth {alpha}: alpha must be between 0 and 1 (SmoothQuant uses 0.5).")
    if float(min_ratio) < 1.0:
        raise BadInputError(f"int8.smooth.min_ratio {min_ratio}: must be at least 1.")
    ok, skipped = candidates(model, swappable)
    report = {"alpha": float(alpha), "min_ratio": float(min_ratio), "smoothed": [],
              "skipped": [{"layer": s["layer"], "reason": s["reason"]} for s in skipped]}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not ok:
        return out, report
    amax = channel_absmax(model, [c["output"] for c in ok], batch, fixed=fixed, tasks=tasks)
    nodes = {n.name: n for n in out.graph.node}
    for c in ok:
        a = amax[c["output"]].astype(np.float64)
        ratio = float(a.max() / max(float(np.median(a)), 1e-12))
        if ratio < min_ratio:
            continue  # even channels: per-tensor INT8 already fits them
        weights = [(_own(out, nodes[n], 1), axis) for n, _w, axis in c["consumers"]]
        arrays = [numpy_helper.to_array(w).astype(np.float64) for w, _a in weights]
        wmax = np.max([np.abs(w).max(axis=1 - axis) for w, (_t, axis) in zip(arrays, weights)], axis=0)
        s = np.power(np.maximum(a, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1.0 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        for k in (1, 2):  # LayerNorm gain and bias: X / s
            t = _own(out, nodes[c["node"]], k)
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) / s).astype(np.float32), t.name))
        for (t, axis), arr in zip(weights, arrays):  # the weight rows of the input channels: diag(s) W
            scaled = arr * (s[:, None] if axis == 0 else s[None, :])
            t.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), t.name))
        report["smoothed"].append({"layer": c["layer"], "node": c["node"], "ratio": round(ratio, 1),
                                   "consumers": [n for n, _w, _a in c["consumers"]]})
    return out, report
