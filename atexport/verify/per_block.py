"""Per-block comparison: where, inside the network, an artifact starts to differ from PyTorch.

Polygraphy's "mark all outputs", made automatic for atexport's ViTs. The artifact's ONNX graph gets a
copy with the residual stream and the adapter outputs of every transformer block added as graph outputs;
the PyTorch model records the same tensors with forward hooks; both run on the same batch, and the
stages are compared in execution order. The first stage whose relative error exceeds the per-block
tolerance (``per_block_max_rel`` in ``export_configs/tolerances.yaml``) is named, with the numbers: a
corrupted adapter weight shows at ``blocks.N.adapter``, an FP16 overflow or a badly quantized layer at
the block where the error jumps.

Mapping graph tensors to PyTorch modules does not rely on names (simplifiers drop the exporter's node
metadata and rename tensors). It uses the structure every atexport ViT export keeps at opset >= 20:

* each ``nn.LayerNorm`` call is one ``LayerNormalization`` node, and they run in a chain, so the k-th
  such node in the (topologically sorted) graph is the k-th LayerNorm call that forward hooks record:
  the input of ``blocks.i.norm1`` is the block's input (block ``i - 1``'s output), the input of
  ``blocks.i.norm2`` the stream after attention (``blocks.i.attn``);
* after ``norm2``'s input ``m``, the block's residual ``Add(m, mlp)`` is the inner block's output
  (``blocks.i.block``), and with an adapter the next ``Add`` adds the adapter's output
  (``blocks.i.adapter``), giving the block's output (``blocks.i``), which must be the next block's
  ``norm1`` input: checked, so a mapping that does not hold is an error, not a wrong answer.

Casts (FP16), Q/DQ pairs (INT8) and Identity nodes between these points are looked through.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from atexport.artifact.onnx import with_outputs
from atexport.errors import AtexportError

_PASS = ("Cast", "Identity", "QuantizeLinear", "DequantizeLinear")
_NORM = re.compile(r"^blocks\.(\d+)\.(?:block\.)?norm([12])$")
_FLOAT_GROWTH_FLOOR = 1e-7


@dataclass
class Stage:
    """One compared tensor.

    Attributes:
        name: ``embed``, ``blocks.3.attn``, ``blocks.3.block``, ``blocks.3.adapter``, ``blocks.3``,
            ``fc_norm input``, ``logits``.
        tensor: the graph tensor it was read from.
        max_abs: largest absolute difference.
        rel: ``max_abs`` relative to the largest reference value of the stream at that point (for an
            adapter output, of the block's output it is added to).
        cosine: smallest per-sample cosine similarity.
    """

    name: str
    tensor: str
    max_abs: float
    rel: float
    cosine: float
    block: int | None = None


@dataclass
class PerBlockResult:
    """The per-block comparison of one artifact against PyTorch."""

    artifact: str
    precision: str
    tolerance: float
    samples: int
    stages: list[Stage] = field(default_factory=list)
    first_over: str | None = None
    jump: str | None = None

    @property
    def culprit(self) -> str | None:
        """The stage to blame: the first over tolerance, else where the error grows most."""
        return self.first_over or self.jump

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def summary(self) -> str:
        """One sentence naming where the error jumps, with the numbers."""
        name = self.culprit
        if name is None:
            worst = max(self.stages, key=lambda s: s.rel) if self.stages else None
            where = f" (largest rel. error {worst.rel:.3g} at {worst.name})" if worst else ""
            return (f"{self.artifact}: every stage within the per-block tolerance {self.tolerance:g} and no jump "
                    f"in the error{where}.")
        idx = [s.name for s in self.stages].index(name)
        s = self.stages[idx]
        before = max((t.rel for t in self.stages[:idx]), default=0.0)
        verdict = "first stage over" if name == self.first_over else "largest jump; all stages within"
        prior = f"at most {before:.3g} before it" if idx else "the first stage compared"
        return (f"{self.artifact}: the error jumps at {name} (rel. error {s.rel:.3g}, max abs {s.max_abs:.3g}, "
                f"min cosine {s.cosine:.6f}; {prior}; {verdict} the per-block tolerance {self.tolerance:g}).")

    def table(self) -> str:
        head = f"{'stage':<22} {'max abs':>10} {'rel':>10} {'min cos':>10}"
        lines = [head, "-" * len(head)]
        for s in self.stages:
            mark = "  <- first over tolerance" if s.name == self.first_over else (
                "  <- largest jump" if s.name == self.jump and not self.first_over else "")
            lines.append(f"{s.name:<22} {s.max_abs:>10.3g} {s.rel:>10.3g} {s.cosine:>10.6f}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["culprit"] = self.culprit
        d["summary"] = self.summary()
        return d


# --------------------------------------------------------------------------------------------------
# PyTorch side


def capture_torch(model, batch: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """Run ``model`` on ``batch`` recording block, adapter and LayerNorm-input tensors.

    Returns:
        ``({stage name: array}, [LayerNorm module names in call order])``.
    """
    import torch

    values: dict[str, np.ndarray] = {}
    ln_calls: list[str] = []
    handles = []

    def keep(name):
        def hook(_m, _inp, out):
            values[name] = out.detach().float().cpu().numpy()
        return hook

    def keep_input(name):
        def hook(_m, inp):
            ln_calls.append(name)
            values[f"ln:{len(ln_calls) - 1}"] = inp[0].detach().float().cpu().numpy()
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            handles.append(mod.register_forward_pre_hook(keep_input(name)))
    for i, blk in enumerate(getattr(model, "blocks", [])):
        handles.append(blk.register_forward_hook(keep(f"blocks.{i}")))
        inner, adapter = getattr(blk, "block", None), getattr(blk, "adapter", None)
        if inner is not None and adapter is not None:
            handles.append(inner.register_forward_hook(keep(f"blocks.{i}.block")))
            handles.append(adapter.register_forward_hook(keep(f"blocks.{i}.adapter")))
    try:
        with torch.inference_mode():
            values["logits"] = model(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).float().cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    return values, ln_calls


# --------------------------------------------------------------------------------------------------
# ONNX side


def _graph_maps(graph):
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _origin(name: str, producer) -> str:
    """Follow Cast / Identity / Q-DQ back to the tensor they copy."""
    seen = 0
    while name in producer and producer[name].op_type in _PASS and seen < 8:
        name = producer[name].input[0]
        seen += 1
    return name


def _aliases(name: str, consumers) -> set[str]:
    """``name`` and every tensor that is a Cast / Identity / Q-DQ copy of it."""
    out, todo = {name}, [name]
    while todo:
        t = todo.pop()
        for n in consumers.get(t, []):
            if n.op_type in _PASS and n.input and n.input[0] == t:
                for o in n.output:
                    if o not in out:
                        out.add(o)
                        todo.append(o)
    return out


def _add_consumers(name: str, consumers) -> list:
    seen, out = set(), []
    for t in _aliases(name, consumers):
        for n in consumers.get(t, []):
            if n.op_type == "Add" and id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out


def locate_stages(proto, ln_calls: list[str], adapters: dict[int, bool]) -> list[tuple[str, str, int | None]]:
    """Map stage names to graph tensors: ``[(stage, tensor, block index or None), ...]`` in execution order.

    Args:
        proto: the artifact's ``onnx.ModelProto``.
        ln_calls: LayerNorm module names in PyTorch call order (from :func:`capture_torch`).
        adapters: ``{block index: has an adapter}``.

    Raises:
        AtexportError: the graph does not have the structure described in the module docstring.
    """
    g = proto.graph
    producer, consumers = _graph_maps(g)
    lns = [n for n in g.node if n.op_type == "LayerNormalization"]
    if len(lns) != len(ln_calls):
        raise AtexportError(
            f"per-block mapping: the graph has {len(lns)} LayerNormalization nodes, the PyTorch model makes "
            f"{len(ln_calls)} LayerNorm calls; export at opset >= 20 keeps one node per call."
        )
    norm_in: dict[tuple[int, int], str] = {}
    stages: list[tuple[str, str, int | None]] = []
    others: list[tuple[str, str, int | None]] = []
    for node, name in zip(lns, ln_calls):
        m = _NORM.match(name)
        if m:
            norm_in[(int(m.group(1)), int(m.group(2)))] = node.input[0]
        else:
            others.append((f"{name} input", node.input[0], None))
    depth = len(adapters)
    if depth == 0 or (0, 1) not in norm_in:
        raise AtexportError("per-block mapping: no transformer blocks (blocks.N.norm1) found in the PyTorch model.")
    stages.append(("embed", norm_in[(0, 1)], None))
    for i in range(depth):
        if (i, 2) not in norm_in:
            raise AtexportError(f"per-block mapping: blocks.{i} has no norm2 call.")
        mid = _origin(norm_in[(i, 2)], producer)
        stages.append((f"blocks.{i}.attn", norm_in[(i, 2)], i))
        adds = _add_consumers(mid, consumers)
        if len(adds) != 1:
            raise AtexportError(f"per-block mapping: expected one residual Add after blocks.{i}.attn, found {len(adds)}.")
        inner = adds[0].output[0]
        out = inner
        if adapters.get(i):
            adds = _add_consumers(inner, consumers)
            if len(adds) != 1:
                raise AtexportError(f"per-block mapping: expected one adapter Add after blocks.{i}.block, found {len(adds)}.")
            add = adds[0]
            inner_set = _aliases(inner, consumers)
            other = [t for t in add.input if t not in inner_set]
            if len(other) != 1:
                raise AtexportError(f"per-block mapping: cannot tell the adapter output of blocks.{i} apart.")
            stages.append((f"blocks.{i}.block", inner, i))
            stages.append((f"blocks.{i}.adapter", other[0], i))
            out = add.output[0]
        if i + 1 < depth:
            nxt = _origin(norm_in[(i + 1, 1)], producer)
            if nxt != out and nxt not in _aliases(out, consumers):
                raise AtexportError(
                    f"per-block mapping: blocks.{i}'s output ({out}) is not blocks.{i + 1}'s input ({nxt}); "
                    "the graph does not have the expected ViT structure."
                )
        stages.append((f"blocks.{i}", out, i))
    seen = {_origin(t, producer) for _s, t, _i in stages}
    stages.extend(o for o in others if _origin(o[1], producer) not in seen)  # e.g. `norm` reads the last block
    return stages


def _metrics(ref: np.ndarray, cand: np.ndarray, scale: float) -> tuple[float, float, float]:
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    cand = np.asarray(cand, np.float64).reshape(len(cand), -1)
    if not np.isfinite(cand).all():
        return float("inf"), float("inf"), 0.0
    diff = np.abs(ref - cand)
    max_abs = float(diff.max()) if diff.size else 0.0
    num = (ref * cand).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(diff.sum(1) == 0, 1.0, 0.0))
    return max_abs, max_abs / max(scale, 1e-12), float(cos.min()) if len(cos) else 1.0


def _per_block_tolerance(precision: str, tolerances="tolerances", tolerance: float | None = None) -> float:
    from atexport.parity.tolerances import per_block_tolerance

    return float(tolerance) if tolerance is not None else per_block_tolerance(precision, tolerances)


def compare_blocks(
    model,
    artifact,
    batch: np.ndarray,
    *,
    precision: str = "fp32",
    tolerance: float | None = None,
    tolerances="tolerances",
    name: str | None = None,
    threads: int | None = None,
    feeds: dict | None = None,
) -> PerBlockResult:
    """Compare every block (and adapter) of an ONNX artifact with the PyTorch model on ``batch``.

    Args:
        model: the PyTorch reference (``nn.Module`` with ``blocks``), in eval mode.
        artifact: path or ``onnx.ModelProto`` of the ONNX model to examine.
        batch: preprocessed float32 NCHW images (a handful is enough).
        precision: selects the per-block tolerance.
        tolerance: explicit per-block relative tolerance (overrides the table).
        tolerances: tolerance table name or path in ``export_configs/``, or its loaded dict.
        name: label of the artifact in the result.
        threads: ONNX Runtime threads.
        feeds: extra named inputs for the artifact (e.g. swapped task weights).
    """
    from atexport.errors import require

    onnx = require("onnx", "the per-block comparison of ONNX models", "onnx")
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    proto = artifact if isinstance(artifact, onnx.ModelProto) else onnx.load(str(artifact))
    label = name or (str(artifact) if not isinstance(artifact, onnx.ModelProto) else "model")
    tol = _per_block_tolerance(precision, tolerances, tolerance)
    ref, ln_calls = capture_torch(model, batch)
    adapters = {i: getattr(b, "adapter", None) is not None for i, b in enumerate(getattr(model, "blocks", []))}
    located = locate_stages(proto, ln_calls, adapters)
    ln_pos = {call: k for k, call in enumerate(ln_calls)}
    norm_calls = {(int(m.group(1)), int(m.group(2))): c for c in ln_calls if (m := _NORM.match(c))}
    torch_vals = {}
    for stage, _t, i in located:
        if stage == "embed":
            torch_vals[stage] = ref[f"ln:{ln_pos[norm_calls[(0, 1)]]}"]
        elif stage.endswith(".attn"):
            torch_vals[stage] = ref[f"ln:{ln_pos[norm_calls[(i, 2)]]}"]
        elif stage.endswith(" input"):
            torch_vals[stage] = ref[f"ln:{ln_pos[stage[: -len(' input')]]}"]
        else:
            torch_vals[stage] = ref[stage]
    fixed = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value or None
    marked = with_outputs(proto, [t for _s, t, _i in located])
    out_name = proto.graph.output[0].name
    names = list(dict.fromkeys([t for _s, t, _i in located] + [out_name]))
    runner = OnnxRuntimeRunner(marked.SerializeToString(), threads=threads, name=label)
    got: dict[str, list] = {n: [] for n in names}
    with runner:
        step = fixed or len(batch)
        for s in range(0, len(batch), step):
            x = batch[s : s + step]
            n = len(x)
            if fixed and n < fixed:
                x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
            res = runner.run(x, output_names=names, **(feeds or {}))
            for k in names:
                got[k].append(np.asarray(res[k], np.float32)[:n])
    cand = {k: np.concatenate(v) for k, v in got.items()}
    result = PerBlockResult(artifact=label, precision=precision, tolerance=tol, samples=int(len(batch)))
    for stage, tensor, i in located:
        r = torch_vals[stage]
        c = cand[tensor].reshape(r.shape) if cand[tensor].size == r.size else cand[tensor]
        if c.shape != r.shape:
            raise AtexportError(f"per-block mapping: {stage} has shape {c.shape} in the graph, {r.shape} in PyTorch.")
        scale_ref = torch_vals[f"blocks.{i}"] if stage.endswith(".adapter") else r
        mx, rel, cos = _metrics(r, c, float(np.abs(scale_ref).max()) if scale_ref.size else 1.0)
        result.stages.append(Stage(stage, tensor, mx, rel, cos, i))
    mx, rel, cos = _metrics(ref["logits"], cand[out_name], float(np.abs(ref["logits"]).max()))
    result.stages.append(Stage("logits", out_name, mx, rel, cos, None))
    _blame(result)
    return result


def _blame(result: PerBlockResult) -> None:
    """Set ``first_over`` (first stage over tolerance) and ``jump`` (the stage whose error grows most over
    every earlier stage's, if some stage grows at least 10x: float noise alone does not make a jump)."""
    best, growth_best, worst_before = None, 10.0, 0.0
    for s in result.stages:
        if result.first_over is None and not (s.rel <= result.tolerance):
            result.first_over = s.name
        growth = s.rel / max(worst_before, _FLOAT_GROWTH_FLOOR) if np.isfinite(s.rel) else float("inf")
        if growth >= growth_best and s.rel > _FLOAT_GROWTH_FLOOR:
            best, growth_best = s.name, growth
        worst_before = max(worst_before, s.rel if np.isfinite(s.rel) else float("inf"))
    result.jump = best
