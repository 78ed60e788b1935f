"""Task weights for separable models, in a torch-free file: ``.npz`` written from an atexport checkpoint.

A separable model (``atexport onnx --separable``) runs any task trained on its backbone by feeding that
task's adapter and head tensors by name. A checkpoint is a torch file, so an app without PyTorch needs
those tensors in another form: :func:`export_task_weights` writes them to a NumPy ``.npz`` (tensors keyed
by their checkpoint names, plus a small JSON record of the task: name, classes, backbone fingerprint,
adapter config). :func:`load_task` reads an ``.npz`` with numpy only (or a checkpoint, with torch), and
:func:`check_task` refuses, with every reason, task weights that do not fit a model, the way
:func:`atexport.export.swap.check_compatible` refuses a checkpoint.

::

    export_task_weights("runs/cars/run.pt", "cars.npz")      # once, where torch is installed
    model = load_model("model.onnx"); model.set_task("cars.npz")  # in the app, torch-free
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError, MissingDependencyError

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


def _task_info(ckpt, name: str) -> dict:
    return {
        "format": TASK_FORMAT,
        "format_version": TASK_FORMAT_VERSION,
        "task": name,
        "backbone": {"name": ckpt.model.backbone, "fingerprint": ckpt.fingerprint, "model_args": ckpt.model.model_args},
        "adapter": ckpt.adapter.to_dict() if ckpt.adapter else None,
        "regime": ckpt.regime,
        "num_classes": int(ckpt.model.num_classes),
        "class_names": list(ckpt.model.class_names) if ckpt.model.class_names else None,
        "preprocess": ckpt.preprocess,
    }


def _from_checkpoint(ckpt, name: str | None = None) -> TaskWeights:
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.export.swap import _as_numpy

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    if ckpt.regime == "full":
        raise IncompatibleCheckpointError(
            f"checkpoint {ckpt.path}: a full fine-tune changes the backbone itself; only adapter or head "
            "checkpoints can be swapped into a separable model."
        )
    name = name or ckpt.name
    arrays = {
        k: _as_numpy(v, np.float32) for k, v in ckpt.state_dict.items() if ".adapter." in k or k.startswith("head.")
    }
    return TaskWeights(name=name, arrays=arrays, info=_task_info(ckpt, name),
                       source=str(ckpt.path) if ckpt.path else None)


def export_task_weights(ckpt, output: str | os.PathLike | None = None, *, name: str | None = None) -> Path:
    """Write a checkpoint's adapter and head tensors to a torch-free ``.npz`` (atomically).

    Args:
        ckpt: a ``run.pt`` path or a loaded :class:`~atexport.checkpoint.Checkpoint` (reading it needs torch).
        output: the ``.npz`` to write; default ``<checkpoint stem>.npz`` beside the checkpoint.
        name: the task's name (default: the checkpoint's file stem).

    Returns:
        The path written.
    """
    from atexport.utils.io import atomic_write_bytes, check_writable

    task = _from_checkpoint(ckpt, name)
    if output is None:
        if task.source is None:
            raise BadInputError("give an output path (-o): the checkpoint was not loaded from a file.")
        output = Path(task.source).with_suffix(".npz")
    output = check_writable(output, "-o")
    if Path(output).suffix != ".npz":
        raise BadInputError(f"-o {output}: task weights are written as NumPy .npz; give a path ending in .npz.")
    buf = io.BytesIO()
    np.savez(buf, **task.arrays, **{_INFO_KEY: np.array(json.dumps(task.info))})
    return atomic_write_bytes(output, buf.getvalue())


def _read_npz(path: Path, flag: str) -> TaskWeights:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled objects), OSError
        raise BadInputError(f"{flag} {path}: not a readable task-weights .npz ({str(e)[:200]}).") from None
    info = {}
    if _INFO_KEY in arrays:
        try:
            info = json.loads(str(arrays.pop(_INFO_KEY)))
        except json.JSONDecodeError as e:
            raise BadInputError(f"{flag} {path}: damaged task record ({e}).") from None
        if int(info.get("format_version", 0)) > TASK_FORMAT_VERSION:
            raise BadInputError(f"{flag} {path}: task format v{info.get('format_version')} is newer than this atexport.")
    if not arrays:
        raise BadInputError(f"{flag} {path}: holds no tensors.")
    return TaskWeights(name=str(info.get("task") or path.stem), arrays=arrays, info=info, source=str(path))


def load_task(source, name: str | None = None, flag: str = "--adapter") -> TaskWeights:
    """Task weights from an ``.npz`` (numpy only), a checkpoint (``.pt``, needs torch), or a dict of arrays.

    Args:
        source: path of an ``.npz`` from :func:`export_task_weights` or of a checkpoint; a
            :class:`TaskWeights`; or ``{tensor name: array}`` (then ``name`` is required).
        name: the task's name (default: the file's recorded name, else its stem).
        flag: how the source is named in error messages.
    """
    if isinstance(source, TaskWeights):
        return TaskWeights(name or source.name, source.arrays, source.info, source.source)
    if isinstance(source, Mapping):
        if not name:
            raise BadInputError("task weights given as a dict need a name.")
        return TaskWeights(name=name, arrays={k: np.asarray(v) for k, v in source.items()})
    if not isinstance(source, (str, os.PathLike)):
        if type(source).__name__ == "Checkpoint":
            return _from_checkpoint(source, name)
        raise BadInputError(f"{flag}: expected an .npz or checkpoint path, got {type(source).__name__}.")
    path = Path(source)
    if not path.is_file():
        raise BadInputError(f"{flag} {path}: no such file (give a task .npz from 'atexport export-task' or a run.pt).")
    if path.suffix == ".npz":
        task = _read_npz(path, flag)
        if name:
            task.name = name
        return task
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise MissingDependencyError(
            f"{flag} {path}: reading a checkpoint needs torch, which is not installed here; convert it once "
            f"where torch is installed with: atexport export-task --ckpt {path} -o {path.with_suffix('.npz')}"
        )
    return _from_checkpoint(path, name)


def check_task(meta, task: TaskWeights, where: str = "the model") -> dict[str, np.ndarray]:
    """Refuse ``task`` unless it fits the separable model ``meta``; return its arrays by initializer name.

    Checked (when the task records them): same backbone and fingerprint, adapter rank, placement and
    scale, class count; always: the tensors are exactly the model's swappable tensors, shape for shape.

    Raises:
        IncompatibleCheckpointError: with every reason found.
    """
    from atexport.export.swap import check_weights

    label = f"task {task.name!r}" + (f" ({task.source})" if task.source else "")
    if not meta.separable or not meta.manifest:
        raise IncompatibleCheckpointError(
            f"{where} was exported without --separable: its adapter and head weights are fused into the graph, "
            "so no task can be selected. Re-export it with 'atexport onnx --separable'."
        )
    reasons = []
    info = task.info or {}
    bb, mbb = info.get("backbone") or {}, meta.backbone or {}
    if bb.get("name") and bb.get("name") != mbb.get("name"):
        reasons.append(f"backbone {bb.get('name')} != the model's {mbb.get('name')}")
    if bb.get("fingerprint") and bb.get("fingerprint") != mbb.get("fingerprint"):
        reasons.append(
            f"backbone fingerprint {str(bb.get('fingerprint'))[:12]} != the model's {str(mbb.get('fingerprint'))[:12]} "
            "(adapters trained on another backbone)"
        )
    ad, mad = info.get("adapter"), meta.adapter
    if info and ad and mad:
        for key in ("rank", "every", "alpha"):
            if float(ad.get(key, 0)) != float(mad.get(key, 0)):
                reasons.append(f"adapter {key}={ad.get(key)} != the model's {mad.get(key)}")
    elif info and (ad is None) != (mad is None):
        reasons.append("the model has adapters and the task none" if mad else "the task has adapters, the model none")
    if info.get("num_classes") is not None and meta.num_classes is not None and int(info["num_classes"]) != int(meta.num_classes):
        reasons.append(f"{info['num_classes']} classes != the model's {meta.num_classes}")
    if reasons:
        raise IncompatibleCheckpointError(f"{label} does not fit {where}: " + "; ".join(reasons) + ".")
    return check_weights(meta, task.arrays, f"{where} ({label})")
