"""Top-1 routing, observed: the chosen expert per token in PyTorch and in an exported graph, and the near-ties.

Adapter-X's routers (:mod:`atexport.adapters.adapterx`) pick one expert per (sub-)token: ``ArgMax`` over
softmax probabilities. Where the top two probabilities nearly tie, FP16 or INT8 rounding (or even a
different FP32 summation order) can flip the choice, which changes that token's adapter output. This
module is the family's *probe* (:meth:`atexport.adapters.base.AdapterFamily.probes`) that ``atexport
verify`` runs in every backend where routing can be observed:

- PyTorch: the family's probe module (Adapter-X's :class:`~atexport.adapters.adapterx.RoutingProbe`, given to
  :class:`RoutingCheck`) returns every routed block's probabilities;
- an ONNX graph (FP32, FP16, INT8, single- or multi-task): :meth:`RoutingCheck.expose` adds the input of
  every ``ArgMax`` node, i.e. exactly the probabilities the graph decides on (after FP16 casts or INT8
  Q/DQ), as extra graph outputs. The dense static export has one ``ArgMax`` per routed block and no
  other, in block order; a graph where that does not hold is reported as not observable, never guessed;
- a TensorRT engine does not expose intermediate tensors: not observable there (verify its ONNX model).

Why a graph edit of the artifact rather than a separate probe export: the probe must observe the
artifact as deployed (its FP16 casts, its INT8 quantization), which a fresh FP32 export cannot, and
verify must not import the export layer. The edit is done here, in the family's layer, with onnx only.

:meth:`RoutingCheck.compare` gives the numbers: tokens, chosen experts that differ from PyTorch
(``flipped``), of which at a near-tie in PyTorch (top-2 gap below :data:`FLIP_GAP`), the smallest top-2
gap, the share of tokens with a gap below 1e-3. FP32 graphs must choose the same expert as PyTorch
except at near-ties (gap below :data:`FLIP_GAP`, where float summation order decides); FP16 and INT8
flips are reported, not failed: their logits tolerances decide whether the model passes.
"""

from __future__ import annotations

import numpy as np

TIE = 1e-3
"""A top-2 gap below this is a near-tie (reported as a share of tokens)."""

FLIP_GAP = 1e-4
"""An FP32 graph may choose another expert than PyTorch only where PyTorch's top-2 gap is below this."""


def routing_margins(probs) -> dict:
    """Routing near-ties from probabilities ``[..., N]`` (torch or numpy): the gap between the top two.

    Returns ``{"tokens", "min_gap", "median_gap", "below_1e-3", "below_1e-2"}`` (shares of tokens).
    """
    p = probs.detach().float().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs, dtype=np.float32)
    gap = _gaps(p.reshape(-1, p.shape[-1]))
    return {"tokens": int(gap.size), "min_gap": float(gap.min()), "median_gap": float(np.median(gap)),
            "below_1e-3": float((gap < 1e-3).mean()), "below_1e-2": float((gap < 1e-2).mean())}


def _gaps(p2: np.ndarray) -> np.ndarray:
    top2 = np.sort(p2, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


class RoutingCheck:
    """The chosen expert per token, PyTorch against an exported graph (see the module docstring).

    Args:
        probe: the family's probe module class: ``probe(model)(x) -> (logits, probs of each routed block...)``
            (Adapter-X's :class:`~atexport.adapters.adapterx.RoutingProbe`; passed in, so this module does not
            import the family that uses it).
    """

    name = "routing"
    title = "expert choice per token"

    def __init__(self, probe=None):
        self.probe = probe

    def reference(self, model, x: np.ndarray) -> list[np.ndarray]:
        """Every routed block's probabilities in the PyTorch model, ``[B, T_block, heads, N]`` float32 each
        (``T_block`` may differ between blocks: Adapter-X's prompt tokens)."""
        import torch

        if self.probe is None:
            raise ValueError("RoutingCheck(probe) is needed to read the PyTorch model's routing")
        with torch.inference_mode():
            _, *probs = self.probe(model).eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return [p.float().cpu().numpy() for p in probs]

    def expose(self, proto):
        """``(copy of proto with the routing probabilities as extra outputs, their names in block order)``;
        ``None`` where the graph has no ``ArgMax`` (not a routed model)."""
        import onnx

        names = [n.input[0] for n in proto.graph.node if n.op_type == "ArgMax"]
        if not names:
            return None
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # best effort: unknown types default to float
            inferred = model
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        have = {o.name for o in model.graph.output}
        for t in names:
            if t not in have:
                model.graph.output.append(onnx.helper.make_tensor_value_info(t, types.get(t) or onnx.TensorProto.FLOAT,
                                                                             None))
                have.add(t)
        return model, names

    def compare(self, reference: np.ndarray, got, precision: str = "fp32") -> dict:
        """The routing of a graph (``got``: one array per ``ArgMax``, in graph order) against PyTorch's.

        Returns:
            ``{"observed", "blocks", "tokens", "flipped", "flipped_at_near_ties", "min_gap", "median_gap",
            "below_1e-3", "passed", "summary"}``; ``observed`` False (and ``passed`` True) where the graph's
            routing could not be matched to PyTorch's blocks.
        """
        ref = [np.asarray(r, dtype=np.float32) for r in reference]
        got = [np.asarray(g, dtype=np.float32) for g in got]
        n = ref[0].shape[-1] if ref else 0
        if not ref or len(got) != len(ref) or any(g.size != ref[k].size for k, g in enumerate(got)):
            return {"observed": False, "passed": True,
                    "summary": f"not observable: {len(got)} ArgMax nodes in the graph for {len(ref)} routed "
                               "blocks in PyTorch (or other shapes)"}
        r2 = np.concatenate([r.reshape(-1, n) for r in ref])
        g2 = np.concatenate([g.reshape(-1, n) for g in got])
        ref_gap, got_gap = _gaps(r2), _gaps(g2)
        flipped = r2.argmax(-1) != g2.argmax(-1)
        at_ties = int((flipped & (ref_gap < FLIP_GAP)).sum())
        out = {"observed": True, "blocks": len(ref), "tokens": int(len(r2)), "flipped": int(flipped.sum()),
               "flipped_at_near_ties": at_ties, "min_gap": float(min(ref_gap.min(), got_gap.min())),
               "median_gap": float(np.median(ref_gap)), "below_1e-3": float((ref_gap < TIE).mean())}
        hard = out["flipped"] - at_ties
        out["passed"] = bool(precision != "fp32" or hard == 0)
        verdict = ("same expert for every token" if not out["flipped"] else
                   f"{out['flipped']} of {out['tokens']} tokens chose another expert ({at_ties} at near-ties)")
        out["summary"] = (f"{verdict}; smallest top-2 gap {out['min_gap']:.2e}, "
                          f"{100 * out['below_1e-3']:.2f}% of tokens below {TIE:g}")
        if not out["passed"]:
            out["summary"] += f"; FP32 must match PyTorch away from near-ties (gap >= {FLIP_GAP:g}): FAIL"
        return out
