"""What the on-device runners (LiteRT, ExecuTorch) share: metadata from the sidecar, a batch of 1 run one
image at a time, and the separable model's tasks fed as inputs.

An artifact written by ``atexport litert`` / ``atexport executorch`` takes a batch of 1 (what phones run);
:meth:`EdgeRunner.infer` takes any batch and runs it image by image. A separable one takes the task's
adapter and head tensors as inputs after the image: the runner holds tasks like
:class:`~atexport.runtime.session.AdapterSession` (``add_task`` / ``use`` / ``infer(task=...)``); the task
exported with it is read from ``<artifact>.task.npz`` beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.runtime.base import Runner
from atexport.runtime.session import TaskHolder


def own_task_path(model: str | os.PathLike) -> Path:
    """The task stored with a separable on-device model: ``model.tflite`` -> ``model.tflite.task.npz``."""
    p = Path(model)
    return p.with_name(p.name + ".task.npz")


class EdgeRunner(TaskHolder, Runner):
    """Base of the LiteRT and ExecuTorch runners.

    Subclasses set ``fmt`` and ``flag_hint``, and implement :meth:`_load` (open the artifact; return the
    image input, logits output and every input's key) and :meth:`_run_one` (one image plus weight inputs
    -> logits ``(1, classes)``).
    """

    fmt = "edge"

    def __init__(self, model, metadata=None, name: str = "edge"):
        super().__init__()
        self.model, self.metadata, self.name = model, metadata, name
        self.where = str(model) if isinstance(model, (str, os.PathLike)) else f"in-memory {self.fmt} model"
        self._weight_inputs: dict[str, Any] = {}
        self._tasks: dict[str | None, dict[str, np.ndarray]] = {None: {}}
        self.task: str | None = None
        self.precision: str | None = None

    def _load(self, record: dict) -> None:
        raise NotImplementedError

    def _run_one(self, x: np.ndarray, weights: dict) -> np.ndarray:
        raise NotImplementedError

    def _activate(self):
        if self.metadata is None:
            from atexport.artifact.edge import read_edge_sidecar

            self.metadata, _ = read_edge_sidecar(self.model)
        record = (self.metadata.extra or {}).get(self.fmt) or {}
        self._load(record)
        self._weight_inputs = dict(record.get("weight_inputs") or {})
        missing = [n for n in self.metadata.manifest if n not in self._weight_inputs]
        if self.metadata.separable and missing:
            raise BadInputError(f"{self.where}: its manifest names tensors {missing[:3]} the model takes no input "
                                f"for; re-export it with 'atexport {self.fmt} --separable'.")
        self.precision = self.metadata.precision
        self._tasks = {None: self._own_weights() if self._weight_inputs else {}}
        self.task = None

    def _own_weights(self) -> dict[str, np.ndarray]:
        from atexport.artifact.fit import check_weights
        from atexport.artifact.tasks import load_task

        if not isinstance(self.model, (str, os.PathLike)):
            return {}  # in-memory model: no stored task; add one with add_task
        own = own_task_path(self.model)
        if not own.is_file():
            raise BadInputError(f"{self.where}: the task weights {own.name} of this separable model are missing "
                                "beside it; copy them with the model.")
        return check_weights(self.metadata, load_task(own, flag="--model").arrays, self.where)

    @property
    def separable(self) -> bool:
        return bool(self._weight_inputs)

    def _check_swappable(self) -> None:
        if not self.is_active:
            self.activate()
        if not self._weight_inputs:
            raise IncompatibleCheckpointError(
                f"{self.where} holds one task with its adapter and head weights fused into the graph; "
                f"re-export it with 'atexport {self.fmt} --separable' to swap tasks."
            )

    def _infer(self, batch, task: Any = "__current__", **feeds):
        from atexport.artifact.bank import task_input

        spec = task_input(self.metadata)  # multi-task model: (task input name, tasks)
        ids = feeds.pop(spec[0], None) if spec else None
        if feeds or (spec and ids is None):
            raise BadInputError(f"{self.where}: takes {'a ' + repr(spec[0]) + ' input' if spec else 'no extra inputs'}"
                                f" (got {sorted(feeds) or 'none'}).")
        weights = self._task_feeds(task) if self._weight_inputs else {}
        if self._weight_inputs and not weights:
            raise BadInputError(f"{self.where}: no task loaded to run; add one with add_task (a task .npz).")
        weights = {self._weight_inputs[k]: v for k, v in weights.items()}
        if ids is not None:
            ids = np.broadcast_to(np.asarray(ids, dtype=np.int64).reshape(-1), (len(batch),)).copy()
            bad = [int(v) for v in ids if not 0 <= int(v) < spec[1]]
            if bad:
                raise BadInputError(f"{self.where}: task id {bad[0]} out of range (it serves {spec[1]} tasks).")
        key = ((self.metadata.extra or {}).get(self.fmt) or {}).get("task_input")
        rows = [np.asarray(self._run_one(batch[i: i + 1], weights if ids is None else
                                         {**weights, key: np.ascontiguousarray(ids[i: i + 1])}),
                           dtype=np.float32).reshape(1, -1)
                for i in range(len(batch))]
        width = int((self.metadata.output or {}).get("shape", [1, 0])[-1] or 0)
        return np.concatenate(rows) if rows else np.zeros((0, width), np.float32)


def open_edge(runner_cls, path, options, **kwargs):
    """The loader both on-device backends share: refuse a file of another format, then open ``path`` with
    ``runner_cls`` (its metadata from the sidecar; the runner takes any batch, one image at a time).

    Returns:
        An :class:`~atexport.runtime.backends.Opened` with an active runner.
    """
    from atexport.runtime.backends import BACKENDS, LoadOptions, Opened

    o = options or LoadOptions()
    fmt = runner_cls.fmt
    want = BACKENDS[fmt].suffixes[0]
    if Path(path).suffix.lower() != want:
        raise BadInputError(f"{o.flag} {path}: expected a {want} file written by 'atexport {fmt}'.")
    runner = runner_cls(str(path), name=fmt, **kwargs)
    runner.activate()
    return Opened(runner.metadata, runner, runner.metadata.mode)
