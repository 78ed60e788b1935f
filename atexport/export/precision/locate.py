"""Where a precision model breaks: the first Linear layer whose output leaves the per-block tolerance.

When a FP16 or INT8 model fails its parity check, the logits say *that* it broke, not *where*. Both
graphs keep the FP32 model's Linear nodes and their output tensors (the converters add Casts and Q/DQ
pairs around them, never rename them), so each Linear output is marked as a graph output in both, the
two run on a few of the judged images, and the layers are compared in graph order. The first whose
relative error (max abs difference over the largest reference value) exceeds the per-block tolerance
of the precision (``per_block_max_rel`` in ``export_configs/tolerances.yaml``) is named by its PyTorch
module name (``blocks.1.attn.qkv``); if none does, the layer where the error grows most (10x or more).
"""

from __future__ import annotations

import numpy as np

from atexport.parity.tolerances import per_block_tolerance

IMAGES = 8


def _outputs(proto, names: list[str], x: np.ndarray, tasks: tuple | None) -> dict[str, np.ndarray]:
    from atexport.artifact.bank import mixed_task_ids
    from atexport.artifact.onnx import with_outputs
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    fixed = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value or None
    if fixed and len(x) != fixed:
        x = np.concatenate([x] * -(-fixed // len(x)))[:fixed]
    feeds = {tasks[0]: mixed_task_ids(len(x), tasks[1])} if tasks else {}
    with OnnxRuntimeRunner(with_outputs(proto, names).SerializeToString(), name="locate") as r:
        out = r.run(x, output_names=names, **feeds)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def locate_break(src, candidate, batch: np.ndarray, precision: str, *, tolerances: str = "tolerances",
                 tasks: tuple | None = None) -> str | None:
    """One sentence naming the first Linear layer of ``candidate`` whose output leaves the per-block
    tolerance against ``src`` (the FP32 model), or ``None`` when the layers cannot be compared.

    Args:
        src: the FP32 ``onnx.ModelProto``.
        candidate: the precision model (``ModelProto`` or bytes).
        batch: preprocessed images (the first :data:`IMAGES` are used).
        precision: selects the per-block tolerance.
        tolerances: the tolerance table in ``export_configs/``.
        tasks: a multi-task model's ``(task input name, number of tasks)``: tasks are fed round-robin.
    """
    import onnx

    from atexport.export.precision.inspect import LINEAR_OPS, layer_names

    if isinstance(candidate, (bytes, bytearray)):
        candidate = onnx.load_from_string(bytes(candidate))
    if batch is None or not len(batch):
        return None
    tol = per_block_tolerance(precision, tolerances)
    src_out = {n.name: n.output[0] for n in src.graph.node if n.op_type in LINEAR_OPS}
    layers = [(n.name, n.output[0]) for n in candidate.graph.node
              if n.op_type in LINEAR_OPS and src_out.get(n.name) == n.output[0]]
    if not layers:
        return None
    names = [t for _n, t in layers]
    x = np.ascontiguousarray(batch[:IMAGES], np.float32)
    try:
        ref, got = _outputs(src, names, x, tasks), _outputs(candidate, names, x, tasks)
    except Exception:  # noqa: BLE001 - localisation is a diagnosis on top of a failure, never a new failure
        return None
    module = layer_names(src)
    worst = (0.0, None)
    for node, tensor in layers:
        r, c = ref[tensor][: len(x)], got[tensor][: len(x)]
        rel = float(np.abs(r - c).max() / max(float(np.abs(r).max()), 1e-12)) if np.isfinite(c).all() else float("inf")
        where = module.get(node, node)
        label = where if where == node else f"{where} ({node})"
        if not rel <= tol:
            prior = f"at most {worst[0]:.3g} in the layers before it" if worst[1] else "the first layer"
            return (f"the error first leaves the per-block tolerance {tol:g} at {label}: relative error {rel:.3g} "
                    f"of its output ({prior}).")
        worst = max(worst, (rel, label), key=lambda w: w[0])
    return (f"every Linear layer's output is within the per-block tolerance {tol:g} (largest: {worst[1]}, "
            f"relative error {worst[0]:.3g}); the logits drift without one layer to blame.")
