"""The multi-task bank layout: its constants, and how one task's tensors become its slice of the bank.

A multi-task model (``atexport onnx --multitask``) stacks every task's adapter and head tensors along
a leading *task axis*; the image batch comes with a per-sample ``task_id`` input, and logits are padded
to the widest task with :data:`PAD_LOGIT`. This module is the single description of that layout, in
numpy only, so export, ``atexport tasks``, TensorRT refit, the runtime, verify and bench all read the
same constants and build the same slices.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from atexport.errors import IncompatibleCheckpointError

PAD_LOGIT = -1.0e4


TASK_INPUT = "task_id"


TASK_AXIS = "tasks"


BANK_PREFIX = "bank."


LAYOUT = "gather"


REGIMES = ("adapter", "head")


def task_fingerprint(state_dict: Mapping[str, Any]) -> str:
    """sha256 over a task's tensors (names, shapes, float32 bytes): identifies a task's weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        a = as_f32(state_dict[name])
        h.update(name.encode())
        h.update(str(tuple(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def as_f32(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def bank_entry(source: str, shape: Sequence[int], *, transpose: bool = False, block: int | None = None,
               role: str = "adapter", pad_value: float | None = None) -> dict:
    """One bank tensor as an adapter family declares it (see :func:`bank_layout`).

    Args:
        source: the checkpoint tensor a task's slice comes from (``blocks.3.adapter.down.weight``); the
            bank's initializer is ``bank.`` + this name.
        shape: the per-task slice shape (after the transpose), without the task axis.
        transpose: the slice is the checkpoint tensor transposed (2-D tensors read as ``x @ W``).
        block: the transformer block the tensor belongs to (``None``: shared by every block).
        role: ``adapter`` or ``head``.
        pad_value: the value of padded entries along the last axis (heads), ``None``: no padding.
    """
    entry = {"source": str(source), "shape": [int(v) for v in shape], "transpose": bool(transpose),
             "pad_value": pad_value, "role": role}
    if block is not None:
        entry["block"] = int(block)
    return entry


def adaptertune_tensors(dim: int, rank: int, placed: Sequence[int]) -> list[dict]:
    """AdapterTune's bank tensors: per placed block ``down`` (``[D, r]``, ``[r]``) and ``up`` (``[r, D]``, ``[D]``)."""
    out = []
    for i in placed:
        for part, w_shape, b_len in (("down", [dim, rank], rank), ("up", [rank, dim], dim)):
            src = f"blocks.{i}.adapter.{part}"
            out.append(bank_entry(f"{src}.weight", w_shape, transpose=True, block=i))
            out.append(bank_entry(f"{src}.bias", [b_len], block=i))
    return out


def bank_layout(dim: int, rank: int | None, placed: Sequence[int], max_classes: int, *,
                tensors: Sequence[Mapping] | None = None) -> dict[str, dict]:
    """The bank's tensors (without the task axis) and where each task's slice comes from.

    Args:
        dim: the model width.
        rank, placed: AdapterTune's rank and adapted blocks (``rank=None``: a head-only bank); ignored when
            ``tensors`` is given.
        max_classes: the logits width.
        tensors: the adapter family's bank tensors (:func:`bank_entry` records, in graph-input order), as
            :meth:`atexport.adapters.base.AdapterFamily.bank_tensors` declares them; ``None``: AdapterTune's
            (:func:`adaptertune_tensors`) from ``rank`` and ``placed``.

    Returns:
        ``{initializer name: {"source": checkpoint tensor, "shape": slice shape, "transpose": bool,
        "pad_value": value of padded classes or None, "role", "block"}}``, in graph-input order: the adapter
        tensors, then the head's.
    """
    if tensors is None:
        tensors = adaptertune_tensors(dim, rank, placed) if rank is not None else []
    out: dict[str, dict] = {}
    for e in tensors:
        name = f"{BANK_PREFIX}{e['source']}"
        if name in out:
            raise ValueError(f"bank tensor {e['source']} declared twice")
        out[name] = dict(e)
    out[f"{BANK_PREFIX}head.weight"] = bank_entry("head.weight", [dim, max_classes], transpose=True, role="head",
                                                  pad_value=0.0)
    out[f"{BANK_PREFIX}head.bias"] = bank_entry("head.bias", [max_classes], role="head", pad_value=PAD_LOGIT)
    return out


def bank_manifest(layout: Mapping[str, dict], tasks: int) -> dict:
    """The metadata manifest of a bank of ``tasks`` tasks: initializer, shape (task axis first), dtype,
    role, block, and the ``bank`` recipe turning a checkpoint tensor into a task's slice."""
    out = {}
    for name, e in layout.items():
        entry = {
            "initializer": name,
            "shape": [int(tasks), *[int(v) for v in e["shape"]]],
            "dtype": "float32",
            "role": e["role"],
            "bank": {"axis": 0, "source": e["source"], "transpose": bool(e["transpose"]), "pad_value": e["pad_value"]},
        }
        if "block" in e:
            entry["block"] = int(e["block"])
        out[name] = entry
    return out


def task_slice(entry: Mapping, tensor) -> np.ndarray:
    """One task's slice of a bank tensor from its checkpoint tensor (transposed and padded as recorded).

    Torch-free (numpy arrays are accepted), so a runtime or a TensorRT refit can build slices too.
    """
    b = entry["bank"]
    a = as_f32(tensor)
    if b["transpose"]:
        a = np.ascontiguousarray(a.T)
    want = list(entry["shape"][1:])
    if b.get("pad_value") is not None and list(a.shape) != want:
        if a.ndim != len(want) or list(a.shape[:-1]) != want[:-1] or a.shape[-1] > want[-1]:
            raise IncompatibleCheckpointError(
                f"{b['source']} of shape {list(as_f32(tensor).shape)} does not fit the bank's {want} "
                f"(the model holds at most {want[-1]} classes)."
            )
        pad = [(0, 0)] * (a.ndim - 1) + [(0, want[-1] - a.shape[-1])]
        a = np.pad(a, pad, constant_values=np.float32(b["pad_value"]))
    if list(a.shape) != want:
        raise IncompatibleCheckpointError(f"{b['source']} of shape {list(a.shape)} does not fit the bank's {want}.")
    return np.ascontiguousarray(a, dtype=np.float32)


def task_slices(manifest: Mapping[str, dict], state_dict: Mapping[str, Any], where: str = "the checkpoint") -> dict:
    """Every bank tensor's slice for one task: ``{initializer: array}``; the tensors must match exactly."""
    sources = {e["bank"]["source"] for e in manifest.values()}
    missing = sorted(sources - set(state_dict))
    extra = sorted(set(state_dict) - sources)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"tensors missing: {missing[:5]}")
        if extra:
            parts.append(f"tensors the multi-task model has no place for: {extra[:5]}")
        raise IncompatibleCheckpointError(f"{where} does not fit the bank: {'; '.join(parts)}.")
    out = {}
    for name, e in manifest.items():
        try:
            out[name] = task_slice(e, state_dict[e["bank"]["source"]])
        except IncompatibleCheckpointError as err:
            raise IncompatibleCheckpointError(f"{where}: {err}") from None
    return out


def task_input(meta) -> tuple[str, int] | None:
    """``(task input name, number of tasks)`` of a multi-task model's metadata, ``None`` otherwise."""
    if not getattr(meta, "tasks", None):
        return None
    spec = (meta.extra or {}).get("task_input") or {}
    return str(spec.get("name", TASK_INPUT)), len(meta.tasks)


def mixed_task_ids(n: int, tasks: int, offset: int = 0) -> np.ndarray:
    """Task ids ``offset, offset+1, ...`` modulo ``tasks``: consecutive samples of different tasks."""
    return ((np.arange(n) + int(offset)) % max(int(tasks), 1)).astype(np.int64)


def task_count(meta) -> int:
    """Number of tasks of a multi-task model's metadata (0 for other models)."""
    return len(getattr(meta, "tasks", None) or [])
