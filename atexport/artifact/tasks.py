"""One task's weights, torch-free: the object every layer hands around, and its ``.npz`` file format.

A task is a set of adapter and head tensors plus a small record of what they were trained for
(backbone name, fingerprint and overrides, regime, adapter config, classes, preprocessing).
:class:`TaskWeights` carries both; a checkpoint hands its task down as one
(:meth:`atexport.checkpoint.Checkpoint.task_weights`), ``atexport export-task`` writes one to an
``.npz`` (:func:`task_npz_bytes`), and the runtime reads it back with numpy only (:func:`load_task`).
Whether a task fits a model is decided in one place, :mod:`atexport.artifact.fit`.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atexport.errors import BadInputError

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
_SEED_FOLDER = re.compile(r"^seed_\d+$")


def default_task_name(source) -> str:
    """A task's default name, the same in every command: the run folder's name for ``atexport train``'s
    ``runs/cars/run.pt`` (and ``runs/cars/seed_1/run.pt``: "cars-seed_1"), otherwise the file's stem.

    Args:
        source: a path, or an object with a ``path`` attribute (a checkpoint); ``None`` gives ``"task"``.
    """
    p = source if isinstance(source, (str, os.PathLike)) else getattr(source, "path", None)
    if p is None:
        return "task"
    p = Path(p)
    if p.stem in ("run", "last") and p.parent.name:
        if _SEED_FOLDER.match(p.parent.name) and p.parent.parent.name:
            return f"{p.parent.parent.name}-{p.parent.name}"
        return p.parent.name
    return p.stem


def as_numpy(t, dtype=np.float32) -> np.ndarray:
    """A tensor (torch, without importing torch) or array-like as a contiguous numpy array of ``dtype``."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=dtype))


TASK_FORMAT = "atexport.task"


TASK_FORMAT_VERSION = 1


_INFO_KEY = "__atexport__"


@dataclass
class TaskWeights:
    """One task's swappable tensors (numpy, keyed by checkpoint tensor name) and what they are for.

    Attributes:
        name: the task's name.
        arrays: ``{tensor name: array}`` (adapter and head tensors).
        info: ``backbone`` (name, fingerprint, model_args), ``adapter``, ``regime``, ``num_classes``,
            ``class_names``, ``preprocess``; empty for weights given as a bare dict.
        source: the file they were read from, if any.
    """

    name: str
    arrays: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def class_names(self) -> list[str] | None:
        names = self.info.get("class_names")
        return list(names) if names else None


def _read_npz(path: Path, flag: str) -> TaskWeights:
    import zipfile

    if not zipfile.is_zipfile(path):
        raise BadInputError(f"{flag} {path}: not a readable task-weights .npz (not a NumPy .npz archive); write task "
                            "weights with 'atexport export-task'.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):  # numpy's own advice here is to allow pickles: never repeat it
            raise BadInputError(
                f"{flag} {path}: holds pickled Python objects, which atexport never loads (they can run code); "
                "write task weights with 'atexport export-task'."
            ) from None
        raise BadInputError(f"{flag} {path}: not a readable task-weights .npz ({str(e)[:200]}).") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, NotImplementedError, RuntimeError) as e:
        raise BadInputError(f"{flag} {path}: not a readable task-weights .npz ({str(e)[:200] or type(e).__name__}).") from None
    info = {}
    if _INFO_KEY in arrays:
        try:
            info = json.loads(str(arrays.pop(_INFO_KEY)))
        except json.JSONDecodeError as e:
            raise BadInputError(f"{flag} {path}: damaged task record ({e}).") from None
        if not isinstance(info, dict):
            raise BadInputError(f"{flag} {path}: damaged task record (not a JSON object).")
        version = info.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadInputError(f"{flag} {path}: damaged task record (format_version {version!r}).")
        if version > TASK_FORMAT_VERSION:
            raise BadInputError(f"{flag} {path}: task format v{version} is newer than this atexport; upgrade atexport.")
        for key in ("backbone", "adapter", "preprocess"):
            if info.get(key) is not None and not isinstance(info[key], dict):
                raise BadInputError(f"{flag} {path}: damaged task record ({key} must be an object).")
        n, names = info.get("num_classes"), info.get("class_names")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise BadInputError(f"{flag} {path}: damaged task record (num_classes {str(n)[:40]!r}).")
        if names is not None and not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
            raise BadInputError(f"{flag} {path}: damaged task record (class_names must be a list of strings).")
        for key in ("task", "regime"):
            if info.get(key) is not None and not isinstance(info[key], str):
                raise BadInputError(f"{flag} {path}: damaged task record ({key} must be a string).")
    if not arrays:
        raise BadInputError(f"{flag} {path}: holds no tensors.")
    bad = [k for k, a in arrays.items() if a.dtype.kind != "f"]
    if bad:
        raise BadInputError(f"{flag} {path}: tensors {bad[:3]} are not floating point; write task weights with "
                            "'atexport export-task'.")
    nonfinite = [k for k, a in arrays.items() if not np.isfinite(a).all()]
    if nonfinite:  # weights of a diverged run: every prediction would be NaN
        raise BadInputError(f"{flag} {path}: tensors {nonfinite[:3]} hold NaN or infinite values; the run they come "
                            "from diverged. Retrain it with a lower --lr.")
    return TaskWeights(name=str(info.get("task") or default_task_name(path)), arrays=arrays, info=info,
                       source=str(path))


def task_npz_bytes(task: TaskWeights) -> bytes:
    """The ``.npz`` file of ``task``: its tensors by name plus its JSON record (read by :func:`load_task`)."""
    info = {"format": TASK_FORMAT, "format_version": TASK_FORMAT_VERSION, "task": task.name, **task.info}
    buf = io.BytesIO()
    np.savez(buf, **task.arrays, **{_INFO_KEY: np.array(json.dumps(info))})
    return buf.getvalue()


def load_task(source, name: str | None = None, flag: str = "--adapter") -> TaskWeights:
    """Task weights from an ``.npz`` (numpy only), a :class:`TaskWeights`, or a dict of arrays.

    A checkpoint (``run.pt``) is a torch file: the runtime does not read it. Load it where torch is
    installed and pass ``load_checkpoint(path).task_weights()``, or convert it once with
    ``atexport export-task``.

    Args:
        source: path of an ``.npz`` from ``atexport export-task``; a :class:`TaskWeights` or an object with a
            ``task_weights()`` method (a checkpoint); or ``{tensor name: array}`` (then ``name`` is required).
        name: the task's name (default: the file's recorded name, else :func:`default_task_name`).
        flag: how the source is named in error messages.
    """
    if isinstance(source, TaskWeights):
        return TaskWeights(name or source.name, source.arrays, source.info, source.source)
    if hasattr(source, "task_weights") and not isinstance(source, (str, os.PathLike, Mapping)):
        return load_task(source.task_weights(), name, flag)
    if isinstance(source, Mapping):
        if not name:
            raise BadInputError("task weights given as a dict need a name.")
        return TaskWeights(name=name, arrays={k: np.asarray(v) for k, v in source.items()})
    if not isinstance(source, (str, os.PathLike)):
        raise BadInputError(f"{flag}: expected a task .npz path, got {type(source).__name__}.")
    path = Path(source)
    if not path.is_file():
        raise BadInputError(f"{flag} {path}: no such file (give a task .npz from 'atexport export-task').")
    if path.suffix != ".npz":
        raise BadInputError(
            f"{flag} {path}: not a task .npz. A checkpoint is a torch file, which the PyTorch-free runtime does not "
            f"read; convert it once where torch is installed: atexport export-task --ckpt {path} "
            f"-o {path.with_suffix('.npz')}"
        )
    task = _read_npz(path, flag)
    if name:
        task.name = name
    return task
