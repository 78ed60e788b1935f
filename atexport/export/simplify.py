"""Graph simplification of exported ONNX models (onnxslim by default, onnxsim as an alternative).

Simplification runs on the graph *before* the swappable weights are attached as initializers: at that
point they are plain graph inputs, which neither simplifier may fold or rename. Once a tensor is an
initializer (even one that is also a graph input) both simplifiers treat it as a constant and fold it
into neighbours (a Linear weight's Transpose, for instance), and its name disappears. The caller checks
afterwards that every name it needs is still a graph input (:func:`require_inputs`).

Why onnxslim (measured in ``bench/RESULTS.md`` on vit_small and deit_tiny): both simplifiers keep the
dynamic batch axis, the named swappable inputs and parity, and give the same ONNX Runtime latency.
onnxsim removes a few more nodes (only the per-block copies of the dynamic-shape chain, merged into
one: no runtime effect) and runs faster (under 1 s against about 2 s on vit_small, small next to the
export itself); onnxslim is pure Python on top of onnx (onnxsim ships a compiled extension), handles
models over 2 GB, and is already the ``[onnx]`` extra's dependency. onnxsim stays selectable with
``simplifier: onnxsim`` in ``export_configs/onnx.yaml``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from atexport.errors import AtexportError, BadInputError, require

SIMPLIFIERS = ("onnxslim", "onnxsim")


@dataclass
class SimplifyStats:
    """What a simplification did: the tool, node counts before and after, and the time it took."""

    simplifier: str
    nodes_before: int
    nodes_after: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def count_nodes(model) -> int:
    """Nodes of the main graph (the count simplifiers report)."""
    return len(model.graph.node)


def simplify(model, simplifier: str = "onnxslim"):
    """Simplify an ``onnx.ModelProto``; returns ``(model, SimplifyStats)``.

    Args:
        model: the exported model (not modified).
        simplifier: ``"onnxslim"`` or ``"onnxsim"``.

    Raises:
        BadInputError: unknown simplifier.
        MissingDependencyError: the simplifier is not installed.
        AtexportError: the simplifier failed (the unsimplified model is still usable: ``--no-simplify``).
    """
    import onnx

    if simplifier not in SIMPLIFIERS:
        raise BadInputError(f"unknown simplifier {simplifier!r}; expected one of {SIMPLIFIERS}.")
    before = count_nodes(model)
    src = onnx.ModelProto()
    src.CopyFrom(model)
    t0 = time.perf_counter()
    try:
        if simplifier == "onnxslim":
            onnxslim = require("onnxslim", "simplifying exported ONNX graphs", "onnx")
            out = onnxslim.slim(src)
        else:
            onnxsim = require("onnxsim", "simplifying exported ONNX graphs (onnxsim)", None)
            out, ok = onnxsim.simplify(src)
            if not ok:
                raise RuntimeError("onnxsim's own check of the simplified model failed")
    except AtexportError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise AtexportError(f"{simplifier} failed on the exported graph ({msg}); export with --no-simplify.") from e
    if out is None:
        raise AtexportError(f"{simplifier} returned no model; export with --no-simplify.")
    return out, SimplifyStats(simplifier, before, count_nodes(out), time.perf_counter() - t0)


def require_inputs(model, names, what: str = "simplified model") -> None:
    """Check that every name in ``names`` is still a graph input of ``model`` (a bug otherwise)."""
    have = {i.name for i in model.graph.input}
    lost = [n for n in names if n not in have]
    if lost:
        raise AtexportError(
            f"the {what} lost the swappable inputs {lost[:5]} (of {len(lost)}); "
            "export with --no-simplify and report this as a bug."
        )
