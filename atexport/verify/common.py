"""What single- and multi-task verification share: the checks every artifact passes before it is run (its
precision has tolerances, its preprocessing is the checkpoint's), running the artifacts with PyTorch's thread
count, streaming a data set through a reference and every artifact (:func:`run_pass`), the rows made of that
pass, and the end of a run (report, verdict).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.parity.compare import compare
from atexport.parity.tolerances import Tolerances
from atexport.runtime.artifacts import LoadedArtifact
from atexport.verify.result import BackendResult, VerifyResultBase
from atexport.verify.settings import VerifySettings

__all__ = ["BackendResult", "Pass", "TaskFeed", "activated", "backend_row", "batch_of",
           "check_precision_and_preprocess", "chunk_size", "finish", "label_accuracy", "name_artifacts", "pad_failure",
           "preprocess_check", "reference_row", "run_logits", "run_pass"]


def run_logits(runner, x: np.ndarray, batch: int, fixed: bool, ids: np.ndarray | None = None,
               id_name: str = "task_id") -> tuple[np.ndarray, float]:
    """Logits of ``x`` in chunks of ``batch`` (fixed-batch models: padded, then trimmed) and the seconds spent
    in the runner; ``ids``: per-sample task ids, fed as ``id_name`` (multi-task models)."""
    from atexport.runtime.batching import run_batched

    spent: list[float] = []
    per_sample = None if ids is None else {id_name: np.ascontiguousarray(ids, dtype=np.int64)}
    y = run_batched(runner, x, batch, pad=fixed, per_sample=per_sample, timings=spent)
    return y, float(sum(spent))


def batch_of(item: LoadedArtifact, bs: int) -> tuple[int, bool]:
    """Chunk size of ``item`` and whether chunks are padded to it (fixed-batch ONNX models)."""
    b = item.batch if item.batch and (item.pads or item.batch < bs) else bs
    return b, item.pads


def chunk_size(loaded: Sequence[LoadedArtifact], bs: int) -> int:
    """Images decoded at a time: the batch size, or the largest fixed batch of an artifact."""
    return max(bs, *[i.batch or 0 for i in loaded])


# --------------------------------------------------------------------------------------------------
# Before running


def check_precision_and_preprocess(item: LoadedArtifact, ckpt, tol: Tolerances) -> None:
    """Refuse an artifact with no tolerances for its precision, or with other preprocessing than ``ckpt``."""
    if item.tolerance not in tol.logits:
        raise BadInputError(f"{item.artifact.flag} {item.artifact.path}: no tolerances for precision "
                            f"{item.tolerance!r} in {tol.source}.")
    if item.meta.preprocess and dict(item.meta.preprocess) != dict(ckpt.preprocess):
        raise IncompatibleCheckpointError(
            f"{item.artifact.flag} {item.artifact.path}: its preprocessing differs from --ckpt {ckpt.path}'s.")


def name_artifacts(loaded: Sequence[LoadedArtifact]) -> None:
    """Row labels ``backend precision``, with the file name where two artifacts would share one."""
    names = [f"{i.backend} {i.precision}" for i in loaded]
    for i, item in enumerate(loaded):
        item.name = names[i] if names.count(names[i]) == 1 else f"{names[i]} ({item.artifact.path.name})"


@contextmanager
def activated(runners: Sequence, threads: int | None):
    """Runners active (a missing backend fails here, before any work) and PyTorch on ``threads`` threads (the
    same count as ONNX Runtime); both undone on leaving."""
    import torch

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        for r in runners:
            r.activate()
        yield
    finally:
        torch.set_num_threads(prev_threads)
        for r in runners:
            r.deactivate()


# --------------------------------------------------------------------------------------------------
# One data set through a reference and every artifact


@dataclass(frozen=True)
class TaskFeed:
    """How a multi-task model is given one task: the task's index, fed as ``input_name``, and the value its
    padded logit columns must hold."""

    index: int
    input_name: str
    pad: float

    def ids(self, n: int) -> np.ndarray:
        return np.full(n, self.index, np.int64)


@dataclass
class Pass:
    """One data set through a reference and every artifact (keyed by ``id(item)``).

    Attributes:
        samples: images run.
        reference: the reference's logits.
        reference_seconds: seconds spent in the reference's inference calls.
        outputs: each artifact's logits (multi-task: the task's columns only).
        seconds: seconds spent in each artifact's inference calls.
        preprocess_max: largest difference of the torch-free preprocessing from timm's transform.
        kept: the first images as the artifacts were fed them (for per-block, probes, mixed batches).
        pad_failures: multi-task: why an artifact's padded logit columns are wrong.
    """

    samples: int
    reference: np.ndarray
    reference_seconds: float
    outputs: dict
    seconds: dict
    preprocess_max: float
    kept: np.ndarray
    pad_failures: dict


def run_pass(ds, preprocess: Mapping, reference, loaded: Sequence[LoadedArtifact], batch_size: int, *, keep: int,
             feeds: Mapping[int, TaskFeed] | None = None, classes: int | None = None, bar=None) -> Pass:
    """Stream ``ds`` through ``reference`` (PyTorch on timm's eval transform) and every artifact (on the torch-free
    :class:`~atexport.runtime.preprocess.Preprocessor`, as an app runs it), after one untimed warm-up batch.

    Args:
        ds: the (subset of the) data set.
        preprocess: the checkpoint's preprocessing.
        reference: the active PyTorch runner.
        loaded: the active artifacts.
        batch_size: images per inference call (a fixed-batch artifact uses its own).
        keep: how many of the first images to keep in :attr:`Pass.kept`.
        feeds: multi-task models: ``{id(item): TaskFeed}``, the task every artifact is given.
        classes: multi-task models: the task's classes; the artifacts' logits are cut to them, the rest checked
            to be the pad logit.
        bar: a :class:`~atexport.utils.progress.Progress` advanced once per chunk.
    """
    from atexport.data import eval_transform
    from atexport.runtime.preprocess import Preprocessor

    timm_tf, pre = eval_transform(preprocess), Preprocessor(preprocess)
    n, bs, chunk = len(ds), int(batch_size), chunk_size(loaded, int(batch_size))
    ref_logits, pt_time, pre_max, kept = [], 0.0, 0.0, []
    outs = {id(i): [] for i in loaded}
    spent = {id(i): 0.0 for i in loaded}
    pad_fail: dict[int, str] = {}
    for start in range(0, n, chunk):
        if bar is not None:
            bar.update(1, postfix=f"{min(start + chunk, n)}/{n} images")
        imgs = [ds.load(k) for k in range(start, min(start + chunk, n))]
        x_pt = np.stack([timm_tf(im).numpy() for im in imgs]).astype(np.float32)
        x_rt = pre(imgs)
        pre_max = max(pre_max, float(np.abs(x_pt - x_rt).max()))
        have = sum(len(k) for k in kept)
        if have < keep:
            kept.append(x_rt[: keep - have])
        if start == 0:
            _warm_up(reference, loaded, x_pt, x_rt, bs, feeds)
        y, t = run_logits(reference, x_pt, bs, False)
        ref_logits.append(y)
        pt_time += t
        for i in loaded:
            feed = feeds[id(i)] if feeds else None
            b, fixed = batch_of(i, bs)
            y, t = run_logits(i.runner, x_rt, b, fixed, *((feed.ids(len(x_rt)), feed.input_name) if feed else ()))
            if classes is not None:
                why = pad_failure(y, classes, feed.pad)
                if why:
                    pad_fail.setdefault(id(i), why)
                y = y[:, :classes]
            outs[id(i)].append(y)
            spent[id(i)] += t
    return Pass(n, np.concatenate(ref_logits), pt_time, {k: np.concatenate(v) for k, v in outs.items()}, spent,
                pre_max, np.concatenate(kept), pad_fail)


def _warm_up(reference, loaded, x_pt, x_rt, bs: int, feeds) -> None:
    """Untimed first calls: they allocate, pick kernels, build ONNX Runtime's caches."""
    reference.infer(x_pt[: min(bs, len(x_pt))])
    for i in loaded:
        b, fixed = batch_of(i, bs)
        xw = x_rt[: (b if fixed else min(b, len(x_rt)))]
        feed = feeds[id(i)] if feeds else None
        run_logits(i.runner, xw, b, fixed, *((feed.ids(len(xw)), feed.input_name) if feed else ()))


def pad_failure(y_full: np.ndarray, classes: int, pad: float) -> str | None:
    """Why a multi-task model's row is not ``classes`` logits followed by pad logits, or ``None``."""
    if y_full.shape[1] < classes:
        return f"the model gives {y_full.shape[1]} logits per row, fewer than the task's {classes} classes"
    if y_full.shape[1] > classes and not np.all(y_full[:, classes:] == np.float32(pad)):
        return f"padded logits are not {pad:g}"
    return None


# --------------------------------------------------------------------------------------------------
# Rows of a pass


def reference_row(p: Pass, accuracy: Callable[[np.ndarray], float | None]) -> BackendResult:
    """The PyTorch FP32 reference's row."""
    return BackendResult("pytorch fp32 (reference)", "pytorch", "fp32", None, p.samples, accuracy(p.reference),
                         p.samples / max(p.reference_seconds, 1e-9), p.reference_seconds)


def backend_row(p: Pass, item: LoadedArtifact, tol: Tolerances, accuracy: Callable[[np.ndarray], float | None],
                task: str | None = None) -> BackendResult:
    """One artifact's row: its logits against the reference's under its precision's tolerance (a multi-task
    model's ``task``: its padded columns too)."""
    y, spent = p.outputs[id(item)], p.seconds[id(item)]
    parity = compare(p.reference, y, tol.logits[item.tolerance], name=item.name if task is None
                     else f"{item.name} [{task}]")
    if p.pad_failures.get(id(item)):
        parity.failures.append(p.pad_failures[id(item)])
    return BackendResult(item.name, item.backend, item.precision, str(item.artifact.path), p.samples, accuracy(y),
                         p.samples / max(spent, 1e-9), spent, parity)


def preprocess_check(p: Pass, tol: Tolerances) -> dict:
    """The torch-free preprocessing against timm's transform on the pass's images."""
    return {"max_abs": p.preprocess_max, "tolerance": tol.preprocess_max_abs, "images": p.samples,
            "passed": bool(p.preprocess_max <= tol.preprocess_max_abs)}


def label_accuracy(targets) -> Callable[[np.ndarray], float]:
    """Top-1 accuracy of logits against ``targets``."""
    labels = np.asarray(targets, dtype=np.int64)
    return lambda y: float((y.argmax(1) == labels).mean())


# --------------------------------------------------------------------------------------------------
# The end of a run


def finish(result: VerifyResultBase, settings: VerifySettings, strict: bool, t_start: float):
    """Time the run, write the report (``settings.report``), and with ``strict`` raise on any failure."""
    result.seconds["total"] = time.perf_counter() - t_start
    if settings.report is not None:
        from atexport.verify.report import write_verify_report

        result.reports = write_verify_report(result, settings.report)
    if strict:
        result.require_passed()
    return result
