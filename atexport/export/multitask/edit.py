"""Editing a deployed multi-task model: list, add, replace and remove tasks, without re-tracing.

The task axis of a multi-task model appears in no node, so an edit rewrites only the bank
initializers and the metadata (``tasks``, ``manifest``). Every edit runs the model before and after
on a fixed batch and checks that the untouched tasks give the same logits (bit-identical in practice),
then writes through :func:`atexport.export.write.write_verified`. In-place edits (the default) are safe
against each other: the model's sha256 is compared under a lock just before the replace
(:mod:`atexport.export.multitask.lock`), so of two concurrent ``atexport tasks add`` one succeeds and the
other fails with exit 2 asking to run it again; a task is never silently lost.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atexport import __version__
from atexport.artifact.bank import task_fingerprint, task_input
from atexport.artifact.fit import check_fits
from atexport.artifact.tasks import default_task_name
from atexport.errors import AtexportError, BadInputError

UNCHANGED_MAX_ABS = 1e-5
"""Largest logit change an untouched task may show after an edit (0 expected: its slice is copied)."""


@dataclass
class TaskEditResult:
    """What :func:`add_task` or :func:`remove_task` wrote.

    Attributes:
        path: the written model.
        metadata: its metadata (``tasks`` and ``manifest`` updated).
        action: ``add``, ``replace`` or ``remove``.
        task: the task's name.
        unchanged_max_abs: largest logit change of the untouched tasks (checked, expected 0).
        parity: one row per untouched task (its logits before vs after the edit).
        failed_path: where an edit that changed untouched tasks was kept (a bug), else ``None``.
        seconds: wall time.
    """

    path: Path
    metadata: Any
    action: str
    task: str
    unchanged_max_abs: float = 0.0
    parity: list = field(default_factory=list)
    failed_path: Path | None = None
    seconds: dict = field(default_factory=dict)


def task_entry(ckpt, name: str, index: int) -> dict:
    """The metadata ``tasks`` entry of ``ckpt`` as task ``index`` named ``name``."""
    return {
        "name": name,
        "index": int(index),
        "num_classes": int(ckpt.model.num_classes),
        "class_names": list(ckpt.model.class_names) if ckpt.model.class_names else None,
        "fingerprint": task_fingerprint(ckpt.state_dict),
        "source": Path(ckpt.path).name if ckpt.path else None,
        "metrics": dict(ckpt.metrics or {}),
    }


def read_multitask(model, flag: str = "--model"):
    """``(proto, metadata, where)`` of a multi-task model (path or ``onnx.ModelProto``); others are refused."""
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.artifact.onnx import read_onnx

    if isinstance(model, (str, os.PathLike)):
        proto, where = read_onnx(model, flag), f"{flag} {model}"
    else:
        proto, where = model, "the model"
    meta = read_onnx_metadata(proto, where)
    if not meta.tasks or "multitask" not in (meta.extra or {}):
        raise BadInputError(
            f"{where} is a single-task model; tasks can be added to models exported with "
            "'atexport onnx --ckpt A --ckpt B ... --multitask' (for a single-task separable model use 'atexport swap')."
        )
    return proto, meta, where


def list_tasks(model) -> list[dict]:
    """The tasks of a multi-task model (path or ``onnx.ModelProto``), in index order."""
    _, meta, _ = read_multitask(model)
    return sorted(meta.tasks, key=lambda t: t["index"])


def bank_arrays(proto, meta, where: str) -> dict[str, np.ndarray]:
    """The bank tensors ``{manifest name: array [K, ...]}`` of a multi-task model proto (manifest checked)."""
    from onnx import numpy_helper

    from atexport.artifact.onnx import check_manifest

    check_manifest(proto, meta.manifest, where)
    inits = {i.name: i for i in proto.graph.initializer}
    return {name: numpy_helper.to_array(inits[e["initializer"]]) for name, e in meta.manifest.items()}


def _write_banks(proto, meta, banks: Mapping[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name in banks:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(banks[init.name]), init.name))
    for name, a in banks.items():
        meta.manifest[name]["shape"] = [int(v) for v in a.shape]
    meta.extra["multitask"]["tasks"] = len(meta.tasks)


def _probe(data: bytes, meta, ids: np.ndarray) -> np.ndarray:
    """Logits of a fixed random batch for the given task ids (in chunks the model accepts)."""
    from atexport.runtime.batching import run_batched
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    b = meta.input["shape"][0]
    bs = int(b) if isinstance(b, int) else 16
    x = np.random.default_rng(0).standard_normal((1, *meta.input["shape"][1:])).astype(np.float32)
    x = np.repeat(x, len(ids), axis=0) + np.linspace(-1, 1, len(ids), dtype=np.float32)[:, None, None, None]
    name, _ = task_input(meta)
    with OnnxRuntimeRunner(data) as r:
        return run_batched(r, x, bs, per_sample={name: np.asarray(ids, dtype=np.int64)})


def _unchanged_rows(before: bytes, after: bytes, meta, kept: Mapping[int, int], names: Mapping[int, str]) -> list:
    """One parity row per untouched task: its logits in the old model vs the edited one (same inputs)."""
    from atexport.parity.compare import Tolerance, compare

    if not kept:
        return []
    old_ids = np.array(sorted(kept), dtype=np.int64)
    new_ids = np.array([kept[i] for i in old_ids.tolist()], dtype=np.int64)
    y_old, y_new = _probe(before, meta, old_ids), _probe(after, meta, new_ids)
    tol = Tolerance(max_abs=UNCHANGED_MAX_ABS, max_rel=UNCHANGED_MAX_ABS, min_cosine=0.99999, min_top1_agreement=1.0)
    return [compare(y_old[old_ids == i], y_new[old_ids == i], tol, name=f"{names[i]} unchanged")
            for i in old_ids.tolist()]


@dataclass
class _OpenEdit:
    """A multi-task model opened for an edit: what was read, where the result goes, and how to write it safely."""

    proto: Any
    meta: Any
    where: str
    output: Path
    source_sha256: str | None  # the model file's hash when it was read (None: not read from a file)
    in_place: bool  # the output is the model file itself
    t0: float  # when the edit started


def _edit(opened: _OpenEdit, banks, action: str, task: str, kept: Mapping[int, int]) -> TaskEditResult:
    """Write banks and metadata, check the untouched tasks still give the same logits, write safely.

    ``kept`` maps old index -> new index of the tasks that must be unchanged.
    """
    from atexport.artifact.metadata import write_onnx_metadata
    from atexport.export.multitask.lock import unchanged_since
    from atexport.export.write import write_verified

    proto, meta, where, output = opened.proto, opened.meta, opened.where, opened.output
    before = proto.SerializeToString()
    old_names = {int(t["index"]): t["name"] for t in list_tasks(proto)} if kept else {}
    _write_banks(proto, meta, banks)
    meta.extra.setdefault("task_edits", []).append(
        {"action": action, "task": task, "tasks": len(meta.tasks), "atexport": __version__,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )
    write_onnx_metadata(proto, meta)
    data = proto.SerializeToString()
    y_new = _probe(data, meta, np.arange(len(meta.tasks), dtype=np.int64))
    if not np.isfinite(y_new).all():
        raise AtexportError(f"{where}: the edited model gives non-finite logits (a bug); nothing was written.")
    rows = _unchanged_rows(before, data, meta, kept, old_names)
    result = TaskEditResult(path=Path(output), metadata=meta, action=action, task=task, parity=rows,
                            unchanged_max_abs=max((r.max_abs for r in rows), default=0.0))
    # The model is replaced only if it is still the file this edit read (another edit may have won).
    with unchanged_since(output, opened.source_sha256, where, check=opened.in_place):
        write_verified(data, output, rows, f"{where}: editing the bank changed the logits of untouched tasks "
                       "(a bug in atexport)", result=result, only_failed=True)
    result.seconds = {"total": time.perf_counter() - opened.t0}
    return result


def _open_edit(model, output) -> _OpenEdit:
    """Read ``model`` for an edit and decide where the result goes (``output``, default the model itself)."""
    from atexport.export.multitask.lock import file_sha256
    from atexport.utils.io import check_writable

    t0 = time.perf_counter()
    is_file = isinstance(model, (str, os.PathLike))
    # Hashed before reading: if the file changes in between, the edit fails at the end (never loses a task).
    sha = file_sha256(model) if is_file else None
    proto, meta, where = read_multitask(model)
    _refuse_int8(meta, where)
    if output is None:
        if not is_file:
            raise BadInputError("give an output path (-o): the model was not read from a file.")
        output = model  # edited in place, atomically
    out = check_writable(output, "-o")
    in_place = is_file and out.resolve() == Path(model).resolve()
    return _OpenEdit(proto, meta, where, out, sha, in_place, t0)


def add_task(model, ckpt, output=None, *, name: str | None = None, replace: bool = False) -> TaskEditResult:
    """Add a task (or, with ``replace=True``, replace one) in a multi-task model, without re-tracing.

    The checkpoint is checked against the model (backbone fingerprint, regime, rank, placement, alpha,
    preprocessing, class count within the model's ``max_classes``), its slice appended to every bank
    tensor (or written over the task's slice), the metadata's ``tasks`` and ``manifest`` updated, the
    model run once to check that the other tasks' logits did not change, and the file written
    atomically. The new task gets the next index; a replaced task keeps its index.

    Args:
        model: the multi-task model (path or ``onnx.ModelProto``; FP32 or FP16).
        ckpt: the task's checkpoint (path or :class:`~atexport.checkpoint.Checkpoint`).
        output: where to write; default: the model file itself (replaced atomically, only if no other
            edit replaced it meanwhile).
        name: the task's name; default :func:`~atexport.artifact.tasks.default_task_name` (the file stem,
            the run folder's name for ``runs/cars/run.pt``).
        replace: replace the task of that name (its index and the others' stay).

    Raises:
        BadInputError: not a multi-task model, an INT8 model, name taken (without ``replace``) or unknown
            (with ``replace``), bad output path, the model changed while this edit ran.
        IncompatibleCheckpointError: the checkpoint does not fit (every reason listed).
    """
    from atexport.checkpoint import Checkpoint, load_checkpoint

    opened = _open_edit(model, output)
    proto, meta, where = opened.proto, opened.meta, opened.where
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    ckpt = ckpt.for_export()
    name = str(name or default_task_name(ckpt))
    slices = check_fits(meta, ckpt.task_weights(name), where)
    by_name = {t["name"]: t for t in meta.tasks}
    banks = bank_arrays(proto, meta, where)
    k = len(meta.tasks)
    if replace:
        if name not in by_name:
            raise BadInputError(f"{where} has no task {name!r} to replace; it has {sorted(by_name)}.")
        idx = int(by_name[name]["index"])
        for b in banks:
            banks[b] = banks[b].copy()
            banks[b][idx] = slices[b]
        meta.tasks[[t["index"] for t in meta.tasks].index(idx)] = task_entry(ckpt, name, idx)
        kept = {i: i for i in range(k) if i != idx}
    else:
        if name in by_name:
            raise BadInputError(
                f"{where} already has a task {name!r}; replace it with --replace, or pick another --name."
            )
        idx = k
        for b in banks:
            banks[b] = np.concatenate([banks[b], slices[b][None]], axis=0)
        meta.tasks.append(task_entry(ckpt, name, idx))
        kept = {i: i for i in range(k)}
    return _edit(opened, banks, "replace" if replace else "add", name, kept)


def remove_task(model, name: str, output=None) -> TaskEditResult:
    """Remove a task from a multi-task model; the tasks after it move down one index.

    Apps must map task names to indices through the metadata (the runtime does); the last task cannot
    be removed. Written like :func:`add_task` (in place by default, safe against concurrent edits).

    Raises:
        BadInputError: not a multi-task model, an INT8 model, unknown task, last task, bad output path,
            the model changed while this edit ran.
    """
    opened = _open_edit(model, output)
    proto, meta, where = opened.proto, opened.meta, opened.where
    by_name = {t["name"]: t for t in meta.tasks}
    if name not in by_name:
        raise BadInputError(f"{where} has no task {name!r}; it has {sorted(by_name)}.")
    if len(meta.tasks) == 1:
        raise BadInputError(
            f"{where}: {name!r} is its only task; a multi-task model needs at least one (delete the file instead)."
        )
    idx = int(by_name[name]["index"])
    banks = {b: np.delete(a, idx, axis=0) for b, a in bank_arrays(proto, meta, where).items()}
    tasks = [dict(t) for t in sorted(meta.tasks, key=lambda t: t["index"]) if t["name"] != name]
    kept = {}
    for new, t in enumerate(tasks):
        kept[int(t["index"])] = new
        t["index"] = new
    meta.tasks = tasks
    return _edit(opened, banks, "remove", name, kept)


def _refuse_int8(meta, where):
    if meta.precision == "int8":
        raise BadInputError(
            f"{where} is an INT8 model, whose calibration ranges were measured with its tasks' adapters; edit the "
            "FP32 model ('atexport tasks add/remove' on it) and quantize it again."
        )
