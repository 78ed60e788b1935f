"""INT8 mixed precision: the Linear layers whose quantization moves the logits most stay float.

:func:`layer_sensitivity` scores each Linear layer by the relative logit error it causes on calibration
images; :func:`choose_keep_float` (``auto``) picks how many of the most sensitive ones to keep float
within a share of the Linear multiply-adds, by measured logit error; or the user names them
(:func:`select_layers` over :func:`~atexport.export.precision.inspect.layer_names`: ``blocks.3.block.mlp.fc2``,
``head``, globs). :func:`keep_layers_float` then makes those layers ordinary float MatMul/Gemm nodes in
the INT8 file. The ranking is cached beside the calibration ranges
(:func:`~atexport.export.precision.calibration.read_sensitivity`) and the choice recorded in the metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from atexport.errors import AtexportError, BadInputError
from atexport.export.precision.inspect import layer_names, producers, prune_qdq, weight_kn

SENSITIVITY_MODES = ("leave_one_out", "only")
RANK_BY = ("sensitivity", "per_cost")
PROBE_CHUNK = 16


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
    prod = producers(qmodel)
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
    prune_qdq(qmodel)
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


def probe_logits(model, x: np.ndarray, fixed: int | None, tasks: tuple | None = None) -> np.ndarray:
    """Logits of an ONNX model (proto or bytes) on ``x`` in ONNX Runtime, in chunks the model accepts
    (padded if its batch is ``fixed``); a multi-task model (``tasks``: task input name, K) gets its tasks
    round-robin, as in calibration."""
    from atexport.artifact.bank import mixed_task_ids
    from atexport.runtime.batching import run_batched
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    data = model if isinstance(model, bytes) else model.SerializeToString()
    per_sample = {tasks[0]: mixed_task_ids(len(x), tasks[1])} if tasks else None
    with OnnxRuntimeRunner(data, name="int8-probe") as r:
        return run_batched(r, np.ascontiguousarray(x, dtype=np.float32), fixed or PROBE_CHUNK, pad=fixed is not None,
                           per_sample=per_sample)


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
    base = logit_error(reference, probe_logits(qmodel, x, fixed, tasks=tasks))
    scores = {}
    t0 = time.perf_counter()
    for i, node in enumerate(nodes):
        keep = [node] if mode == "leave_one_out" else [n for n in nodes if n != node]
        err = logit_error(reference, probe_logits(_variant(qmodel, src, keep), x, fixed, tasks=tasks))["rel_error"]
        scores[node] = base["rel_error"] - err if mode == "leave_one_out" else err
        if i == 0 or (i + 1) % 16 == 0:
            say(f"  sensitivity {i + 1}/{len(nodes)} layers ({time.perf_counter() - t0:.0f}s)")
    return {"mode": mode, "images": int(len(x)), "base": base, "scores": scores}


def linear_costs(model, nodes: Sequence[str]) -> dict[str, int]:
    """Multiply-adds per token of each Linear layer (its weight's element count)."""
    prod = producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    out = {}
    for node in nodes:
        kn = weight_kn(by_name[node], prod, inits)
        out[node] = int(kn[0] * kn[1]) if kn else 0
    return out



def rank_layers(sensitivity: dict, costs: Mapping[str, int], rank_by: str = "sensitivity") -> list[str]:
    """Layers with a positive score, best candidates for float first: by score (``sensitivity``) or by
    score per multiply-add (``per_cost``: the error a layer removes for the latency it costs)."""
    if rank_by not in RANK_BY:
        raise BadInputError(f"int8.keep_float.rank_by {rank_by!r}: expected one of {RANK_BY}.")
    scores = sensitivity["scores"]
    key = (lambda n: -scores[n]) if rank_by == "sensitivity" else (lambda n: -scores[n] / max(costs.get(n, 1), 1))
    return sorted((n for n, s in scores.items() if s > 0), key=key)


@dataclass(frozen=True)
class AutoPolicy:
    """How ``auto`` chooses the layers kept float (the preset's ``int8.keep_float`` section).

    Attributes:
        max_share: the float layers' largest share of the Linear multiply-adds (the latency budget).
        slack: the fraction of the largest error reduction that may be left on the table.
        rank_by: ``sensitivity`` or ``per_cost`` (see :func:`rank_layers`).
    """

    max_share: float = 0.1
    slack: float = 0.1
    rank_by: str = "sensitivity"

    def __post_init__(self):
        if self.rank_by not in RANK_BY:
            raise BadInputError(f"int8.keep_float.rank_by {self.rank_by!r}: expected one of {RANK_BY}.")


@dataclass(frozen=True)
class KeepFloatRequest:
    """A parsed keep-float request and what its measurements depend on and are cached under.

    Attributes:
        kind, value: from :func:`parse_keep_float` (``auto``, ``count`` or ``layers``).
        cfg: the preset's ``int8.keep_float`` section (``sensitivity``, ``images``, ``max_share``, ...).
        fixed, tasks: the model's fixed batch size and task input (name, K), if any.
        cache_path, cache_key: where the sensitivity is cached, and under which calibration key.
        quant_settings: the quantizer settings the sensitivity was measured with.
    """

    kind: str
    value: Any = None
    cfg: Mapping = field(default_factory=dict)
    fixed: int | None = None
    tasks: tuple | None = None
    cache_path: Any = None
    cache_key: Any = None
    quant_settings: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("auto", "count", "layers"):
            raise BadInputError(f"keep-float request {self.kind!r}: expected auto, count or layers.")

    @property
    def requested(self) -> str:
        """The request as the metadata records it."""
        kind, value = self.kind, self.value
        return ",".join(value) if kind == "layers" else str(value) if kind == "count" else kind

    def auto_policy(self) -> AutoPolicy:
        kf = self.cfg
        return AutoPolicy(max_share=float(kf.get("max_share", 0.1)), slack=float(kf.get("slack", 0.1)),
                          rank_by=str(kf.get("rank_by", "sensitivity")))


def choose_keep_float(qmodel, src, sensitivity: dict, costs: Mapping[str, int], x: np.ndarray, reference: np.ndarray,
                      policy: AutoPolicy, *, fixed: int | None = None, tasks: tuple | None = None
                      ) -> tuple[list[str], list[dict]]:
    """``auto``: which layers to keep float, by measured logit error.

    Candidates are the layers with a positive score in :func:`rank_layers` order (``policy.rank_by``), as long
    as the float layers' share of the Linear multiply-adds stays within ``policy.max_share`` (the latency
    budget). The INT8 model with the first k of them in float is scored for k = 0, 1, 2, 3, 4, 6, 8, 12, 16, ...;
    the choice is the smallest k that removes all but ``policy.slack`` (a fraction) of the largest error
    reduction measured: ``err(k) <= best + slack * (err(0) - best)``, so layers that buy almost nothing stay INT8.

    Returns:
        the chosen node names and the trace (``k``, ``rel_error``, ``top1_agreement``, ``float_share``).
    """
    total = max(sum(costs.values()), 1)
    ranked = rank_layers(sensitivity, costs, policy.rank_by)
    order, used = [], 0
    for n in ranked:
        if used + costs.get(n, 0) <= policy.max_share * total:
            order.append(n)
            used += costs.get(n, 0)
    ks = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96) if k < len(order)] + ([len(order)] if order else [])
    trace = [{"k": 0, **sensitivity["base"], "float_share": 0.0}]
    for k in ks:
        err = logit_error(reference, probe_logits(_variant(qmodel, src, order[:k]), x, fixed, tasks=tasks))
        trace.append({"k": k, **err, "float_share": sum(costs.get(n, 0) for n in order[:k]) / total})
    best = min(t["rel_error"] for t in trace)
    bar = best + policy.slack * (trace[0]["rel_error"] - best)
    pick = next(t for t in trace if t["rel_error"] <= bar)
    return order[: pick["k"]], trace


def _cached_sensitivity(model, src, plain: Sequence[str], x: np.ndarray, reference: np.ndarray, mode: str,
                        request: KeepFloatRequest, say) -> tuple[dict, str]:
    """The sensitivity of ``plain`` layers: from the calibration cache when it holds one measured the same
    way, else measured (and stored there). Returns it and the cache status."""
    from atexport.export.precision import calibration as calib

    settings = {"mode": mode, "images": int(len(x)), "quantizer": request.quant_settings, "metric": "rel_error"}
    cache_path, cache_key = request.cache_path, request.cache_key
    sens, status = None, "disabled"
    if cache_path is not None:
        sens, status = calib.read_sensitivity(cache_path, cache_key, settings)
    if sens is not None:
        return sens, "reused"
    say(f"measuring the quantization sensitivity of {len(plain)} Linear layers ({mode}, {len(x)} images) ...")
    sens = layer_sensitivity(model, src, plain, x, reference, mode=mode, fixed=request.fixed, tasks=request.tasks,
                             say=say)
    if cache_path is not None and calib.write_sensitivity(cache_path, cache_key, settings, sens):
        return sens, f"computed ({status}), saved"
    return sens, f"computed ({status})"


def apply_keep_float(model, src, plain: Sequence[str], batch: np.ndarray, request: KeepFloatRequest, say) -> dict:
    """Apply a keep-float request to the INT8 ``model`` in place.

    Args:
        model: the INT8 model; src: the FP32 model it was made from.
        plain: the quantized Linear layers (node names) that may be kept float.
        batch: the calibration images (the first ``request.cfg["images"]`` score the layers).
        request: the parsed request (:class:`KeepFloatRequest`).
        say: receives progress lines.

    Returns:
        What goes into the metadata (``layers``, ``nodes``, ``float_share``, and how they were chosen).
    """
    names = layer_names(src)
    names = {n: names.get(n, n) for n in plain}
    costs = linear_costs(src, plain)
    total = max(sum(costs.values()), 1)
    info: dict[str, Any] = {"requested": request.requested}
    if request.kind == "layers":
        keep = select_layers(request.value, names)
    else:
        keep = _measured_choice(model, src, plain, batch, request, names, costs, info, say)
        keep = [n for n in plain if n in set(keep)]  # graph order
    keep_layers_float(model, src, keep)
    info["layers"] = [names[n] for n in keep]
    info["nodes"] = list(keep)
    info["float_share"] = round(sum(costs[n] for n in keep) / total, 6)
    return info


def _measured_choice(model, src, plain: Sequence[str], batch: np.ndarray, request: KeepFloatRequest,
                     names: Mapping[str, str], costs: Mapping[str, int], info: dict, say) -> list[str]:
    """The layers a ``count`` or ``auto`` request keeps float, by measured sensitivity; records the
    ranking (and the ``auto`` trace) in ``info``."""
    kf, fixed, tasks = request.cfg, request.fixed, request.tasks
    mode = str(kf.get("sensitivity", "only"))
    x = batch[: max(1, int(kf.get("images", 32)))]
    reference = probe_logits(src, x, fixed, tasks=tasks)
    sens, status = _cached_sensitivity(model, src, plain, x, reference, mode, request, say)
    ranked = sorted(plain, key=lambda n: -float(sens["scores"].get(n, 0.0)))
    info["sensitivity"] = {
        "mode": mode, "images": int(len(x)), "metric": "relative logit error", "cache_status": status,
        "int8_rel_error": sens["base"]["rel_error"], "int8_top1_agreement": sens["base"]["top1_agreement"],
        "ranking": [{"layer": names[n], "score": round(float(sens["scores"].get(n, 0.0)), 6)} for n in ranked],
    }
    if request.kind == "count":
        return ranked[: request.value]  # the N most sensitive, whatever they cost
    policy = request.auto_policy()
    keep, trace = choose_keep_float(model, src, sens, costs, x, reference, policy, fixed=fixed, tasks=tasks)
    info["auto"] = {"max_share": policy.max_share, "slack": policy.slack, "rank_by": policy.rank_by,
                    "trace": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.items()} for t in trace]}
    return keep
