"""A live ONNX Runtime session of a separable model whose task weights are swapped per call, not rebuilt.

A model exported with ``--separable`` keeps each adapter and head tensor as a graph input with an
initializer of the same name (an *overridable initializer*): feeding another task's tensors by name
runs that task, exactly (ONNX Runtime does not constant-fold through overridable initializers at any
optimisation level). ``SessionOptions.add_initializer`` is *not* used: it gives silently wrong logits
when the replaced weight feeds a Transpose that ONNX Runtime constant-folds.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from atexport.artifact.fit import check_fits
from atexport.artifact.metadata import ModelMetadata, metadata_from_props
from atexport.artifact.tasks import load_task
from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.runtime.base import Runner


class TaskHolder:
    """Holds several tasks' swappable tensors for one live model and picks one per call.

    Shared by :class:`AdapterSession` (ONNX Runtime) and the OpenVINO runner: a task is loaded with
    :func:`~atexport.artifact.tasks.load_task`, checked with :func:`~atexport.artifact.fit.check_fits`, and
    kept as ``{input name: array}`` to feed; ``None`` is the weights stored in the model file. A subclass
    sets ``self._tasks = {None: ...}``, ``self.task``, ``self.metadata`` and ``self.where``, and
    implements :meth:`_check_swappable` (activate, refuse a model without swappable weights).
    """

    def _check_swappable(self) -> None:
        raise NotImplementedError

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks loaded (``None``, the file's own weights, is always available)."""
        return [t for t in self._tasks if t is not None]

    def add_task(self, task=None, name: str | None = None, *, weights: Mapping[str, Any] | None = None,
                 where: str | None = None) -> str:
        """Load a task's weights (checked against the model, once) without switching to it; returns its name.

        Args:
            task: a task ``.npz`` path, :class:`~atexport.artifact.tasks.TaskWeights`, or a loaded
                :class:`~atexport.checkpoint.Checkpoint` (anything with ``task_weights()``).
            name: task name; default the task's own (:func:`~atexport.artifact.tasks.default_task_name`).
            weights: instead of ``task``, arrays keyed by tensor name (checked against the manifest).
            where: how messages name the model (default: the runner's file).

        Raises:
            IncompatibleCheckpointError: not a separable model, or the tensors do not fit it.
        """
        self._check_swappable()
        if (task is None) == (weights is None):
            raise BadInputError("give either a task (.npz, TaskWeights, checkpoint object) or a weights dict to add_task.")
        loaded = load_task(weights if weights is not None else task, name)
        self._tasks[loaded.name] = check_fits(self.metadata, loaded, where or self.where)
        return loaded.name

    def use(self, name: str | None) -> None:
        """Switch to a loaded task (``None``: the weights stored in the model file)."""
        self._task_feeds(name)
        self.task = name

    def swap(self, task=None, name: str | None = None, *, weights=None) -> str:
        """Load a task and switch to it (the live swap: a dict change, no rebuild); returns its name."""
        name = self.add_task(task, name, weights=weights)
        self.use(name)
        return name

    def remove(self, name: str) -> None:
        """Forget a loaded task (back to the file's weights if it was in use)."""
        if name is None or name not in self._tasks:
            raise BadInputError(f"no task {name!r} loaded; have {self.tasks}.")
        del self._tasks[name]
        if self.task == name:
            self.task = None

    def feeds_for(self, task: str | None = None) -> dict[str, np.ndarray]:
        """The named inputs that select ``task`` (for callers running the model themselves)."""
        return dict(self._task_feeds(task))

    def _task_feeds(self, task) -> dict[str, np.ndarray]:
        """The named inputs that select ``task`` (``"__current__"``: the task in use)."""
        task = self.task if task == "__current__" else task
        if task not in self._tasks:
            raise BadInputError(f"no task {task!r} loaded; have {self.tasks}.")
        return self._tasks[task]


class AdapterSession(TaskHolder, Runner):
    """One live ONNX Runtime session of a separable model; task weights are swapped per call, not rebuilt.

    The swappable tensors are fed by name with every run (they are overridable initializers), so
    :meth:`swap` costs only loading the checkpoint's few MB of tensors, and several tasks can be held
    at once and picked per batch::

        sess = AdapterSession("model.onnx")
        sess.add_task("birds.npz")  # task "birds" (from 'atexport export-task', or a Checkpoint object)
        sess.add_task("cars.npz")
        logits = sess.infer(batch, task="cars")
        sess.use(None)  # back to the weights stored in the file

    The weights are fed as host (numpy) arrays; with a GPU execution provider ONNX Runtime copies them
    to the device on each run (a few MB for a ViT-S with rank-16 adapters), which IO binding could avoid.

    Args:
        model: path, bytes or ``onnx.ModelProto`` of a model exported with ``separable=True``.
        ckpt: optional task to start with instead of the file's own weights (anything
            :func:`~atexport.artifact.tasks.load_task` takes: a task ``.npz``, TaskWeights, a Checkpoint object).
        threads: intra-op threads (None: ONNX Runtime's default).
        providers: execution providers (CPU by default).
        optimization: ONNX Runtime graph optimisation level (``all`` by default; swaps stay exact).
        session: an ``InferenceSession`` of ``model`` already open (its loader's), used on the first activation
            instead of opening a second one.
    """

    def __init__(self, model, ckpt=None, *, threads=None, providers=None, optimization="all",
                 name="onnxruntime-adapters", session=None):
        super().__init__()
        self._given = session
        self.model, self.threads, self.providers, self.optimization = model, threads, providers, optimization
        self.name = name
        self.session = None
        self.metadata: ModelMetadata | None = None
        self._tasks: dict[str | None, dict[str, np.ndarray]] = {None: {}}
        self.task: str | None = None
        self._initial = ckpt
        self.where = str(model) if isinstance(model, (str, os.PathLike)) else "the model"

    def _activate(self):
        from atexport.runtime.onnxruntime import create_session

        self.session, self._given = self._given or create_session(self.model, self.threads, self.providers,
                                                                  self.optimization), None
        self.metadata = metadata_from_props(self.session.get_modelmeta().custom_metadata_map, self.where)
        if not self.metadata.separable or not self.metadata.manifest:
            raise IncompatibleCheckpointError(
                f"{self.where} was exported without --separable; its task weights cannot be swapped. "
                "Re-export it with 'atexport onnx --separable'."
            )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._tasks[None] = {}
        self.task = None
        if self._initial is not None:
            self.swap(self._initial)

    def _deactivate(self):
        self.session = None

    def _check_swappable(self) -> None:
        if self.session is None:  # (also reached from _activate, when a start task was given)
            self.activate()

    def _infer(self, batch, task: Any = "__current__", **feeds):
        feed = {self.input_name: batch, **self._task_feeds(task), **feeds}
        return np.asarray(self.session.run([self.output_name], feed)[0], dtype=np.float32)


def check_session_fits_metadata(meta, session, where: str) -> None:
    """The graph-vs-metadata check (:func:`atexport.artifact.graph.check_graph_fits_metadata`) on an
    ``onnxruntime.InferenceSession``'s inputs, outputs and overridable initializers, and the swap tensors
    and ``task_id`` input its metadata promises."""
    from atexport.artifact.bank import TASK_INPUT
    from atexport.artifact.graph import check_graph_fits_metadata

    check_graph_fits_metadata(meta, {i.name: i.shape for i in session.get_inputs()},
                              {o.name: o.shape for o in session.get_outputs()}, where,
                              tensors={i.name: i.shape for i in session.get_overridable_initializers()})
    inputs = [i.name for i in session.get_inputs()]
    if meta.tasks and TASK_INPUT not in inputs:
        raise BadInputError(f"{where}: its metadata lists tasks but the model has no {TASK_INPUT!r} input ({inputs}).")
    takes = set(inputs) | {i.name for i in session.get_overridable_initializers()}
    missing = [e.get("initializer", n) for n, e in meta.manifest.items() if e.get("initializer", n) not in takes]
    if missing and meta.mode != "single":
        raise BadInputError(f"{where}: its metadata names swappable tensors the graph does not take as inputs "
                            f"({missing[:3]}); re-export the model with atexport.")


def open_onnxruntime(path, options=None):
    """The loader of the ``onnxruntime`` backend: an atexport ONNX model in ONE ONNX Runtime session.

    It sits here, beside :class:`AdapterSession`, because it picks between the two ONNX Runtime runners (this
    module imports :mod:`atexport.runtime.onnxruntime`, never the other way round).

    The metadata is read through ONNX Runtime (no onnx package needed) and checked against the graph; the
    runner takes that session. For an app (``options.app``), a separable model gets an
    :class:`AdapterSession` (task weights fed by name); otherwise a plain runner
    of the file's own weights.

    Returns:
        An :class:`~atexport.runtime.backends.Opened` with an active runner.
    """
    from atexport.runtime.backends import LoadOptions, Opened
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner, create_session

    o = options or LoadOptions()
    where = f"{o.flag} {path}"
    session = create_session(str(path), o.threads, o.providers)
    meta = metadata_from_props(session.get_modelmeta().custom_metadata_map, where)
    check_session_fits_metadata(meta, session, where)
    if meta.mode == "separable" and o.app:
        runner = AdapterSession(str(path), threads=o.threads, providers=o.providers, name="onnxruntime",
                                session=session)
    else:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [x.name for x in session.get_outputs()]
        image, logits = meta.input.get("name"), (meta.output or {}).get("name")
        runner = OnnxRuntimeRunner(str(path), o.threads, o.providers, session=session,
                                   input_name=image if image in inputs else inputs[0],
                                   output_name=logits if logits in outputs else outputs[0])
    runner.activate()
    b = meta.input.get("shape", [None])[0]
    return Opened(meta, runner, meta.mode, b if isinstance(b, int) else None)

