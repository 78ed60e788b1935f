"""A TensorRT refit of one task of a multi-task engine, in numpy: the bank tensors a refit sets.

:func:`atexport.export.tensorrt.refit_engine` reads the engine's current bank (:func:`read_banks`, from
the ONNX model it was built from or the bank ``.npz`` kept beside a refitted engine), asks
:func:`refit_banks` for the bank with one task's slice replaced, and hands those arrays to TensorRT's
refitter. A refit cannot change a tensor's shape, so only an existing task can be replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from atexport.artifact.fit import check_fits
from atexport.artifact.tasks import default_task_name
from atexport.errors import BadInputError
from atexport.export.multitask.edit import bank_arrays, task_entry


def read_banks(path, meta, where: str = "the model") -> dict[str, np.ndarray]:
    """The bank tensors ``{initializer: array}`` of a multi-task model, from its ONNX file or a bank ``.npz``.

    The ``.npz`` is what :func:`atexport.export.tensorrt.refit_engine` writes beside a refitted engine
    (TensorRT's refitter does not hand back an engine's current weights). Shapes are checked against the
    manifest.

    Raises:
        BadInputError: the file does not hold this model's bank (tensors missing or of other shapes).
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            banks = {k: np.asarray(z[k]) for k in z.files}
    else:
        from atexport.artifact.onnx import read_onnx

        banks = bank_arrays(read_onnx(path), meta, where)
    problems = []
    for name, e in meta.manifest.items():
        init = e.get("initializer", name)
        if init not in banks:
            problems.append(f"{init} missing")
        elif list(banks[init].shape) != list(e["shape"]):
            problems.append(f"{init} has shape {list(banks[init].shape)}, the manifest {e['shape']}")
    if problems:
        raise BadInputError(f"{path} does not hold the bank of {where}: " + "; ".join(problems[:4]) + ".")
    return {e.get("initializer", n): banks[e.get("initializer", n)] for n, e in meta.manifest.items()}


def refit_banks(meta, banks: Mapping[str, np.ndarray], ckpt, task: str | None = None,
                where: str = "the engine") -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every bank tensor with one task's slice replaced by ``ckpt``'s: what a TensorRT refit sets.

    A refit cannot change a tensor's shape, so the task must already be in the model (to add one, use
    ``atexport tasks add`` on the ONNX model and rebuild the engine) and its head must fit the model's
    ``max_classes``; the checkpoint is checked as :func:`~atexport.export.multitask.add_task` checks it.

    Args:
        meta: the multi-task model's metadata (the engine sidecar's).
        banks: the current bank tensors (:func:`read_banks`); not modified.
        ckpt: the task's new checkpoint (loaded :class:`~atexport.checkpoint.Checkpoint`).
        task: the task to replace; default :func:`~atexport.artifact.tasks.default_task_name` of ``ckpt``
            (file stem, folder of ``run.pt``).
        where: how the model is named in messages.

    Returns:
        ``(banks, tasks)``: new float32 arrays by initializer name, and ``meta.tasks`` with the task's entry
        (class count, class names, fingerprint, source) replaced; its index is kept.

    Raises:
        BadInputError: a task not in the model, or an INT8 model.
        IncompatibleCheckpointError: the checkpoint does not fit (every reason listed).
    """
    name = str(task or default_task_name(ckpt))
    by_name = {t["name"]: t for t in meta.tasks or []}
    if name not in by_name:
        raise BadInputError(
            f"{where} has no task {name!r} (its tasks: {', '.join(sorted(by_name))}); a refit keeps the bank's shape, "
            "so it can only replace a task: name one with --task-name, or add the task to the ONNX model with "
            "'atexport tasks add' and rebuild the engine."
        )
    if meta.precision == "int8":
        raise BadInputError(
            f"{where} is built from an INT8 model, whose calibration ranges were measured with its tasks' adapters; "
            "replace the task in the FP32 ONNX model ('atexport tasks add --replace'), quantize it again and rebuild."
        )
    if hasattr(ckpt, "for_export"):
        ckpt = ckpt.for_export()
    slices = check_fits(meta, ckpt.task_weights(name), where)
    idx = int(by_name[name]["index"])
    out = {}
    for key, e in meta.manifest.items():
        init = e.get("initializer", key)
        a = np.array(banks[init], dtype=np.float32, copy=True)
        a[idx] = slices[key]
        out[init] = a
    tasks = [task_entry(ckpt, name, idx) if t["name"] == name else dict(t) for t in meta.tasks]
    return out, tasks
