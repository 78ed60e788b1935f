"""Swapping another task into a separable LiteRT (``.tflite``) or ExecuTorch (``.pte``) model, without re-export.

A separable on-device model takes its task's adapter and head tensors as inputs; the task it runs by
default is the ``<artifact>.task.npz`` beside it. :func:`swap_edge` therefore leaves the artifact's
bytes untouched: it checks the other checkpoint against the model's manifest
(:func:`~atexport.artifact.fit.check_fits`, every reason listed), runs the artifact once with the new
tensors (right shape, finite logits; with ``verify`` a full parity check against the checkpoint's PyTorch
model), and writes the artifact (a copy, unless the output is the model itself), its ``.task.npz`` and its
sidecar (task, class names, swap provenance), the artifact last, each atomically.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError


def _runner(fmt: str, data: bytes, meta):
    if fmt == "litert":
        from atexport.runtime.litert import LiteRTRunner

        return LiteRTRunner(data, metadata=meta, name="litert")
    from atexport.runtime.executorch import ExecuTorchRunner

    return ExecuTorchRunner(data, metadata=meta, name="executorch")


def swap_edge(model: str | os.PathLike, ckpt, output: str | os.PathLike | None = None, *, task_name: str | None = None,
              verify: bool = False, backbone_weights=None, images=None, config="onnx"):
    """Write a separable ``.tflite`` / ``.pte`` whose default task is another checkpoint's.

    Args:
        model: a model written by ``atexport litert --separable`` or ``atexport executorch --separable``.
        ckpt: the other task's checkpoint (path or :class:`~atexport.checkpoint.Checkpoint`).
        output: where to write; default ``<task name><suffix>`` beside ``model`` (``cars.tflite`` for
            ``runs/cars/run.pt``); may be ``model``.
        task_name: the task's name in the metadata (default: the checkpoint's).
        verify: check parity against the checkpoint's PyTorch model (needs its backbone).
        backbone_weights, images, config: for ``verify``.

    Returns:
        A :class:`~atexport.export.swap.SwapResult`.

    Raises:
        BadInputError: missing files or sidecar, unwritable output.
        IncompatibleCheckpointError: a fused model, or a checkpoint that does not fit (every reason listed).
        ParityError: ``verify`` found a mismatch (nothing written).
    """
    from atexport.artifact.edge import EDGE_SUFFIXES, edge_sidecar, edge_sidecar_path, read_edge_sidecar
    from atexport.artifact.fit import check_fits
    from atexport.artifact.tasks import task_npz_bytes
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.export.swap import SwapResult
    from atexport.runtime.edge import own_task_path
    from atexport.utils.io import atomic_write_bytes, atomic_write_json, check_writable

    t0 = time.perf_counter()
    src = Path(model)
    where = f"--model {src}"
    if src.suffix.lower() not in EDGE_SUFFIXES or not src.is_file():
        raise BadInputError(f"{where}: give a separable .tflite or .pte written by atexport (no such file, or another kind).")
    meta, record = read_edge_sidecar(src, "--model")
    fmt = record["format"]
    if not (meta.separable and meta.manifest):
        raise IncompatibleCheckpointError(f"{where} holds one task with its adapter and head weights fused into the "
                                          f"graph; re-export it with 'atexport {fmt} --separable' to swap tasks.")
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    ckpt = ckpt.for_export()
    name = task_name or ckpt.name
    out = check_writable(output if output is not None else src.with_name(f"{ckpt.name}{src.suffix}"), "-o")
    if out.suffix.lower() != src.suffix.lower():
        raise BadInputError(f"-o {out}: the swapped model is a {src.suffix} file like {src.name}.")
    task = ckpt.task_weights(name)
    weights = check_fits(meta, task, where)
    data = src.read_bytes()
    with _runner(fmt, data, meta) as runner:
        runner.add_task(weights=weights, name=name)
        runner.use(name)
        x = np.random.default_rng(0).standard_normal((1, *meta.input["shape"][1:])).astype(np.float32)
        y = runner.infer(x, task=name)
        if y.shape != (1, meta.num_classes) or not np.isfinite(y).all():
            raise BadInputError(f"{where} swapped to {ckpt.path}: gives {y.shape} logits (finite: "
                                f"{bool(np.isfinite(y).all())}).")
        seconds = {"swap": time.perf_counter() - t0}
        parity = []
        if verify:
            parity = _verify(runner, meta, ckpt, backbone_weights, images, config)
            seconds["verify"] = time.perf_counter() - t0 - seconds["swap"]
    previous = meta.task
    meta.task = name
    meta.class_names = list(ckpt.model.class_names) if ckpt.model.class_names else None
    meta.extra = dict(meta.extra or {})
    meta.extra["checkpoint"] = {"file": Path(ckpt.path).name if ckpt.path else None, "metrics": ckpt.metrics}
    meta.extra["swap"] = {"from_task": previous, "from_file": src.name, "tensors": len(weights)}
    meta.extra["parity"] = [r.to_dict() for r in parity] or None
    task.arrays = {n: task.arrays[n] for n in meta.manifest}
    atomic_write_bytes(own_task_path(out), task_npz_bytes(task))
    atomic_write_json(edge_sidecar_path(out), edge_sidecar(meta, out.name, fmt, record["sha256"]))
    if out.resolve() != src.resolve():
        atomic_write_bytes(out, data)
    seconds["total"] = time.perf_counter() - t0
    return SwapResult(path=out, metadata=meta, swapped=len(weights), seconds=seconds, parity=parity)


def _verify(runner, meta, ckpt, backbone_weights, images, config):
    from atexport.checkpoint import build_model
    from atexport.export.onnx import load_export_config
    from atexport.parity import ParitySettings, check_parity, photo_batch, require_passed
    from atexport.runtime.torch import TorchRunner

    par = load_export_config(config)["parity"]
    photos = photo_batch(ckpt.preprocess, extra=images, max_images=par.get("max_images"))
    with TorchRunner(build_model(ckpt, backbone_weights=backbone_weights)) as ref:
        rows = check_parity(ref, runner, photos, meta.precision, settings=ParitySettings(
            random_inputs=int(par.get("random_inputs", 8)), seed=int(par.get("seed", 0)), batch_sizes=[1],
            tolerances=par.get("tolerances", "tolerances")))
    require_passed(rows, "the swapped model")
    return rows
