"""The app-facing runtime: load an exported model, preprocess images, predict labels. No PyTorch.

::

    from atexport.runtime import load_model

    model = load_model("model.onnx")            # or "model.engine" (TensorRT, with its .json sidecar)
    for p in model.predict(["cat.jpg", "dog.png"], top_k=3):
        print(p.label, f"{p.score:.1%}", p.topk)

:func:`load_model` reads the atexport metadata stored in the model (ONNX ``metadata_props``, or the
engine's JSON sidecar): the preprocessing (timm's eval transform, reproduced with Pillow and numpy by
:class:`~atexport.runtime.preprocess.Preprocessor`), the class names, and which tasks the model serves:

* a *single-task* model holds one task's weights;
* a *separable* model (``atexport onnx --separable``) runs any task trained on its backbone: select one
  with :meth:`Model.set_task` from a task ``.npz`` (:func:`atexport.runtime.tasks.export_task_weights`,
  torch-free to read) or a checkpoint (needs torch), or hold several with :meth:`Model.add_task` and pick
  per call or per image;
* a *multi-task* model (metadata ``tasks``, a ``task_id`` input, logits padded to the largest task)
  serves all its tasks at once: ``predict(images, task="birds")`` or one task per image
  (``task=["birds", "cars", ...]``); each row is cut to its task's classes.

ONNX models run in ONNX Runtime (or OpenVINO: ``backend="openvino"``, the default for an OpenVINO ``.xml``
IR written by ``atexport openvino``, at an explicit ``precision``, :mod:`atexport.runtime.openvino`); engines
in TensorRT through
:class:`~atexport.runtime.tensorrt.TensorRTRunner`, after the sidecar check that the engine was built for
this GPU and TensorRT version (its GPU memory comes from :mod:`atexport.runtime.cuda`: cuda-python or the
CUDA runtime library, no torch). Multi-task engines take the same per-sample ``task_id`` as the ONNX model.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.artifact.bank import TASK_INPUT
from atexport.artifact.metadata import ModelMetadata
from atexport.runtime.backends import BACKENDS, Backend, LoadOptions, backend_for, choosable, labels
from atexport.runtime.base import Runner
from atexport.runtime.batching import run_batched
from atexport.runtime.preprocess import Preprocessor

ENGINE_SUFFIXES = BACKENDS["tensorrt"].suffixes
DEFAULT_BATCH = 32


@dataclass
class Prediction:
    """The classes predicted for one image.

    Attributes:
        label: name of the top class.
        index: its index in the task's classes.
        score: its softmax probability.
        topk: ``[(label, index, score), ...]``, best first.
        task: the task that classified it (separable and multi-task models), else the model's task.
        source: the image's file path (or ``image.info["name"]``), when known.
    """

    label: str
    index: int
    score: float
    topk: list[tuple[str, int, float]] = field(default_factory=list)
    task: str | None = None
    source: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["topk"] = [{"label": lbl, "index": i, "score": s} for lbl, i, s in self.topk]
        return d


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Model:
    """An exported atexport model ready for inference (see the module docstring; build with :func:`load_model`).

    Attributes:
        path: the model file.
        metadata: its :class:`~atexport.metadata.ModelMetadata`.
        backend: the backend running it, a name of :data:`~atexport.runtime.backends.BACKENDS` (``onnxruntime``,
            ``openvino``, ``tensorrt``, ``litert``, ``executorch``).
        mode: ``"single"``, ``"separable"`` or ``"multitask"``.
        runner: the backend :class:`~atexport.runtime.base.Runner` (active).
        preprocessor: the model's eval transform.
        precision: what runs: the file's precision, or for OpenVINO the runner's (``fp32``, ``bf16``, ``int8+bf16``...).
    """

    def __init__(self, path: Path, metadata: ModelMetadata, runner: Runner, backend: str, mode: str,
                 max_batch: int | None = None):
        self.path, self.metadata, self.runner, self.backend, self.mode = Path(path), metadata, runner, backend, mode
        self.preprocessor = Preprocessor(metadata.preprocess)
        shape = metadata.input.get("shape") or [None]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.max_batch = max_batch
        self._task_classes: dict[str | None, list[str] | None] = {None: metadata.class_names}
        self._task_index = {str(t["name"]): t for t in (metadata.tasks or [])} if mode == "multitask" else {}
        self.task: str | None = None
        if mode == "multitask" and len(self._task_index) == 1:
            self.task = next(iter(self._task_index))

    # ------------------------------------------------------------------ description

    @property
    def tasks(self) -> list[str]:
        """Tasks this model can serve now (multi-task: its tasks; separable: the file's and those added)."""
        if self.mode == "multitask":
            return list(self._task_index)
        own = [self.metadata.task or "default"]
        if self.mode == "separable":
            own += [t for t in self.runner.tasks]
        return own

    @property
    def class_names(self) -> list[str]:
        """Class names of the current task (``str(index)`` where the model records none)."""
        return self._classes(self.task)

    @property
    def kind(self) -> str:
        """The file's kind as earlier releases named it (``onnx``, ``engine``, else the backend); use ``backend``."""
        return {"onnxruntime": "onnx", "tensorrt": "engine"}.get(self.backend, self.backend)

    @property
    def precision(self) -> str:
        """The precision that runs (OpenVINO: what the runner compiled, e.g. ``bf16`` for an FP32 file)."""
        return getattr(self.runner, "precision", None) or self.metadata.precision

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.metadata.preprocess["input_size"])

    def __repr__(self) -> str:
        m = self.metadata
        return (f"Model({self.path.name}: {m.backbone.get('name')} {self.precision} {self.backend}, {self.mode}, "
                f"tasks {self.tasks}, task {self.task!r})")

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ tasks

    def _classes(self, task) -> list[str]:
        if self.mode == "multitask":
            entry = self._task_entry(task)
            names = entry.get("class_names")
            n = int(entry.get("num_classes") or len(names or []))
        else:
            key = self._session_task(task) if self.mode == "separable" else None
            names = self._task_classes.get(key) or self.metadata.class_names
            n = int(self.metadata.num_classes or len(names or []))
        return list(names) if names else [str(i) for i in range(n)]

    def _task_entry(self, task) -> dict:
        if task is None:
            raise BadInputError(
                f"{self.path.name} is a multi-task model serving {list(self._task_index)}; say which with "
                "task=NAME (--task NAME), or one task per image."
            )
        if task not in self._task_index:
            raise BadInputError(f"{self.path.name}: no task {task!r}; it serves {list(self._task_index)}.")
        return self._task_index[task]

    def _session_task(self, task):
        """The key a separable runner knows ``task`` by (``None``: the weights stored in the file)."""
        if task is None or task == (self.metadata.task or "default"):
            return None
        if task not in self.runner.tasks:
            raise BadInputError(f"{self.path.name}: no task {task!r} loaded; have {self.tasks} (add one with add_task).")
        return task

    def _not_separable(self) -> IncompatibleCheckpointError:
        how = ("rebuild it from a separable ONNX model with 'atexport trt --refit' and swap tasks with "
               "'atexport swap --engine'") if self.backend == "tensorrt" else \
            "re-export it with 'atexport onnx --separable'"
        return IncompatibleCheckpointError(
            f"{self.path.name} holds one task ({self.metadata.task!r}) with its adapter and head weights fused "
            f"into the graph; to serve other tasks, {how}."
        )

    def add_task(self, source, name: str | None = None) -> str:
        """Load another task's adapters and head into a separable model, without switching to it.

        Args:
            source: a task ``.npz`` (``atexport export-task``), TaskWeights, a loaded Checkpoint object, or
                ``{tensor: array}`` (then ``name`` is required).
            name: the task's name (default: recorded in the file, else its stem).

        Returns:
            The task's name.

        Raises:
            IncompatibleCheckpointError: the model is not separable, or the weights do not fit it.
        """
        from atexport.artifact.tasks import load_task

        if self.mode != "separable":
            raise self._not_separable()
        task = load_task(source, name, flag="--task")
        self.runner.add_task(task, where=str(self.path.name))  # the one check that the task fits
        self._task_classes[task.name] = task.class_names
        return task.name

    def set_task(self, task, name: str | None = None) -> str:
        """Select the task used when ``predict`` is given none.

        Args:
            task: a task name this model serves; for separable models also a task ``.npz``, a checkpoint
                or a dict of arrays, which is loaded first (:meth:`add_task`).
            name: the name to give weights loaded from ``task``.

        Returns:
            The selected task's name.
        """
        if self.mode == "multitask":
            self._task_entry(task)
            self.task = task
            return task
        if isinstance(task, str) and task in self.tasks:
            self.task = task if self.mode == "separable" and self._session_task(task) is not None else None
            return task
        if self.mode != "separable":
            if isinstance(task, str) and Path(task).suffix not in (".npz", ".pt", ".pth"):
                raise BadInputError(f"{self.path.name} serves one task, {self.metadata.task!r}; there is no task {task!r}.")
            raise self._not_separable()
        if isinstance(task, str) and Path(task).suffix not in (".npz", ".pt", ".pth") and not Path(task).is_file():
            raise BadInputError(f"{self.path.name}: no task {task!r} loaded; have {self.tasks} (or give a task .npz).")
        self.task = self.add_task(task, name)
        return self.task

    # ------------------------------------------------------------------ inference

    def preprocess(self, images) -> np.ndarray:
        """Images (paths, PIL images, uint8 HWC arrays) to the model's float32 NCHW input batch."""
        batch, _ = self._as_batch(images)
        return batch

    def _as_batch(self, images) -> tuple[np.ndarray, list[str | None]]:
        from PIL import Image

        c, h, w = self.input_shape
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            x = images[None] if images.ndim == 3 else images
            if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
                raise BadInputError(
                    f"a float array is taken as a preprocessed batch of shape (N, {c}, {h}, {w}); got {images.shape}. "
                    "Pass images (paths, PIL images or uint8 arrays) to have them preprocessed."
                )
            return np.ascontiguousarray(x, dtype=np.float32), [None] * len(x)
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        items, sources = [], []
        for im in images:
            if isinstance(im, np.ndarray):
                if im.dtype != np.uint8 or im.ndim not in (2, 3):
                    raise BadInputError(f"image arrays must be uint8 HxW or HxWxC; got {im.dtype} {im.shape}.")
                im = Image.fromarray(im)
                sources.append(None)
            elif isinstance(im, Image.Image):
                sources.append(im.info.get("name") if isinstance(im.info.get("name"), str) else None)
            elif isinstance(im, (str, os.PathLike)):
                sources.append(str(im))
            else:
                raise BadInputError(f"cannot read an image from a {type(im).__name__}; give a path, PIL image or uint8 array.")
            items.append(im)
        return self.preprocessor(items), sources

    def _chunk(self) -> int:
        if self.fixed_batch:
            return int(self.fixed_batch)
        return int(min(DEFAULT_BATCH, self.max_batch or DEFAULT_BATCH))

    def _run(self, batch: np.ndarray, per_sample: dict | None = None, **feeds) -> np.ndarray:
        """Run ``batch`` in chunks the model accepts (a fixed batch is padded, then trimmed)."""
        if not len(batch):
            return np.zeros((0, int(self.metadata.num_classes or 0)), np.float32)
        return run_batched(self.runner, batch, self._chunk(), pad=bool(self.fixed_batch), per_sample=per_sample,
                           feeds=feeds)

    def _task_list(self, task, n: int) -> list:
        if isinstance(task, (list, tuple)):
            if len(task) != n:
                raise BadInputError(f"got {len(task)} task names for {n} images; give one per image, or one for all.")
            return [self.task if t is None else t for t in task]
        return [self.task if task is None else task] * n

    def _rows(self, batch: np.ndarray, task) -> tuple[list[np.ndarray], list]:
        """Logits per sample (each cut to its task's classes) and the task of each sample."""
        n = len(batch)
        tasks = self._task_list(task, n)
        if self.mode == "multitask":
            ids = np.array([int(self._task_entry(t)["index"]) for t in tasks], dtype=np.int64)
            logits = self._run(batch, per_sample={TASK_INPUT: ids})
            sizes = [int(self._task_entry(t).get("num_classes") or logits.shape[1]) for t in tasks]
            return [logits[i, : sizes[i]] for i in range(n)], tasks
        if self.mode == "separable":
            keys = [self._session_task(t) for t in tasks]
            rows: list[Any] = [None] * n
            for key in dict.fromkeys(keys):
                idx = [i for i, k in enumerate(keys) if k == key]
                out = self._run(batch[idx], task=key)
                for j, i in enumerate(idx):
                    rows[i] = out[j]
            named = [t if t is not None else (self.metadata.task or "default") for t in tasks]
            return rows, named
        own = self.metadata.task
        for t in set(tasks):
            if t is not None and t != own and t != "default":
                raise BadInputError(
                    f"{self.path.name} holds one task ({own!r}) and cannot run task {t!r}; "
                    "separable or multi-task models select tasks."
                )
        out = self._run(batch)
        want = len(self._classes(None))
        if len(out) and (out.ndim != 2 or out.shape[1] != want):  # the graph declared one width and computed another
            raise BadInputError(f"{self.path}: the model computed logits of shape {list(out.shape)} for {want} "
                                "classes in its metadata; re-export the model with atexport.")
        return list(out), [own] * n

    def logits(self, batch, task=None) -> np.ndarray:
        """Raw logits of a batch (images or a preprocessed float32 NCHW array).

        One task (or none): ``(N, classes of that task)``. One task per image on a multi-task model:
        ``(N, largest class count)``, each row padded with ``-inf`` past its task's classes.
        """
        x, _ = self._as_batch(batch)
        rows, _ = self._rows(x, task)
        if not rows:
            return np.zeros((0, len(self._classes(task if not isinstance(task, (list, tuple)) else self.task))), np.float32)
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), -np.inf, dtype=np.float32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def predict(self, images, top_k: int = 5, task=None) -> list[Prediction]:
        """Classify images.

        Args:
            images: a path, PIL image, uint8 array, a list of those, or a preprocessed float32 NCHW batch.
            top_k: how many classes to list per image (capped at the task's class count).
            task: the task (a name), or one per image; default the selected task (:meth:`set_task`).

        Returns:
            One :class:`Prediction` per image, in order.
        """
        if int(top_k) < 1:
            raise BadInputError(f"--top-k {top_k}: must be at least 1.")
        x, sources = self._as_batch(images)
        rows, tasks = self._rows(x, task)
        preds = []
        for row, t, src in zip(rows, tasks, sources):
            names = self._classes(t if self.mode != "single" else None)
            p = softmax(row[None])[0]
            order = np.argsort(-p, kind="stable")[: min(int(top_k), len(p))]
            top = [(names[i] if i < len(names) else str(i), int(i), float(p[i])) for i in order]
            preds.append(Prediction(label=top[0][0], index=top[0][1], score=top[0][2], topk=top, task=t, source=src))
        return preds


# ---------------------------------------------------------------------------------------- loading


def pick_backend(p: Path, backend: str | None, options: LoadOptions) -> Backend:
    """The backend row to run ``p`` with (the default for its suffix in :data:`~atexport.runtime.backends.BACKENDS`);
    refuse options that backend cannot use."""
    can_choose = choosable()
    if backend is not None and backend not in can_choose:
        raise BadInputError(f"--backend {backend}: expected one of {', '.join(can_choose)}.")
    default = backend_for(p)
    if default is None:
        raise BadInputError(f"--model {p}: unknown model type {p.suffix!r}; give {labels()}.")
    row = BACKENDS[backend] if backend is not None and p.suffix.lower() in BACKENDS[backend].suffixes else default
    row.check_options(p, backend, options)
    return row


def load_model(path: str | os.PathLike, *, task=None, providers: Sequence[str] | None = None,
               threads: int | None = None, device: int = 0, backend: str | None = None,
               precision: str | None = None) -> Model:
    """Load an atexport ONNX model, OpenVINO IR, TensorRT engine, LiteRT or ExecuTorch model for inference.

    The backend is looked up in :data:`~atexport.runtime.backends.BACKENDS` (the default for the file's
    suffix, or ``backend``), whose loader opens the file.

    Args:
        path: ``.onnx``, an OpenVINO ``.xml`` IR (its ``.bin`` beside it), ``.engine`` / ``.plan`` with
            its ``.json`` sidecar beside it, or a LiteRT ``.tflite`` / ExecuTorch ``.pte`` with its
            ``.tflite.json`` / ``.pte.json`` sidecar (LiteRT runs without torch; ExecuTorch's Python runtime
            needs torch).
        task: the task to select: a name (multi-task models), or for separable models a task ``.npz``
            or checkpoint to load (see :meth:`Model.set_task`).
        providers: ONNX Runtime execution providers (default CPU), e.g. ``["CUDAExecutionProvider",
            "CPUExecutionProvider"]``.
        threads: ONNX Runtime or OpenVINO inference threads (default: all cores).
        device: CUDA device of a TensorRT engine.
        backend: ``onnxruntime`` (default for ``.onnx``) or ``openvino`` (default for ``.xml``).
        precision: OpenVINO only: ``fp32``, ``bf16``, ``fp16``, ``int8`` or ``int8+bf16`` (default: the
            file's own; ``model.precision`` says what runs).

    Raises:
        BadInputError: missing or unreadable file, no atexport metadata, missing sidecar, an unknown
            backend, or an option the backend cannot use (``providers`` with OpenVINO, ``precision``
            with ONNX Runtime or an engine).
        MissingDependencyError: onnxruntime, openvino or TensorRT is not installed; the CPU cannot run
            the precision asked for.
        IncompatibleCheckpointError: the engine was built for another GPU or TensorRT version.
    """
    p = Path(path)
    if isinstance(providers, str):  # load_model(m, providers="CPUExecutionProvider"): one provider
        providers = [providers]
    if not p.exists():
        raise BadInputError(f"--model {p}: no such file.")
    if not p.is_file():
        raise BadInputError(f"--model {p}: not a file (give {labels()}).")
    options = LoadOptions(providers=providers, threads=threads, device=device, precision=precision)
    row = pick_backend(p, backend, options)
    opened = row.load(p, options)
    model = Model(p, opened.meta, opened.runner, row.name, opened.mode, max_batch=opened.batch)
    if task is not None:
        model.set_task(task)
    return model


__all__ = ["BACKENDS", "Model", "Prediction", "load_model", "softmax", "ENGINE_SUFFIXES"]
