"""``atexport verify`` of multi-task models: every task against its own PyTorch model, then mixed batches.

A multi-task model (``atexport onnx --ckpt A --ckpt B --multitask``) claims two things, and
:func:`verify_multitask` checks both on a labelled data set:

* *per task*: with every sample given task ``t``, the model's first ``num_classes`` logits equal task
  ``t``'s own PyTorch model (its checkpoint rebuilt) within the tolerances of the model's precision,
  and the padded columns are exactly the pad logit. Each checkpoint is matched to its task by the task
  weights fingerprint recorded in the metadata (:func:`match_tasks`), so a checkpoint that is not in the
  model is refused with the tasks it does hold; any subset of the tasks can be verified.
* *mixed batches*: the verified tasks' images interleaved in one batch (task ids ``0 1 2 0 1 2 ...``;
  with one task verified, every other row goes to another task of the model) give, row for row, the
  model's own single-task results: the batch's composition must not change a sample's logits.

Where a task's adapter family has probes (Adapter-X: the expert chosen per token,
:mod:`atexport.verify.probes`), each task's first images are probed in its own PyTorch model and in every
model fed that task's id: the bank graph keeps one ``ArgMax`` per routed block, so routing is observed in
ONNX Runtime as in single-task models (TensorRT and other runtimes: a "not observable" row).

Rows are labelled per backend, precision and task; a failure names all three and the file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from atexport.artifact.fit import match_tasks
from atexport.errors import BadInputError
from atexport.parity.compare import compare
from atexport.parity.tolerances import Tolerances, resolve_tolerances
from atexport.runtime.artifacts import LoadedArtifact
from atexport.verify.common import (TaskFeed, activated, backend_row, batch_of, check_precision_and_preprocess, finish,
                                    label_accuracy, name_artifacts, pad_failure, preprocess_check, reference_row,
                                    run_logits, run_pass)
from atexport.verify.result import BackendResult, MixedRow, MultiTaskVerifyResult, TaskVerify
from atexport.verify.settings import VerifySettings

__all__ = ["BackendResult", "MIXED_TOLERANCE", "MixedRow", "MultiTaskVerifyResult", "TaskVerify", "verify_multitask"]

MIXED_TOLERANCE = "fp32"
"""The tolerance of the mixed-batch check at every precision: a row's logits must not depend on the other
rows of its batch, so a mixed batch against the same model's single-task batches is float32 rounding."""


def _where(item: LoadedArtifact) -> str:
    return f"{item.artifact.flag} {item.artifact.path}"


@dataclass
class _Task:
    """One checkpoint to verify: its task in the models, its images, and how each model is given it.

    Attributes:
        position: its place among the checkpoints (and the data sets).
        ckpt: the loaded checkpoint.
        name: the task's name (in the first model).
        dataset: the data set's name.
        ds: the images (the seeded ``limit`` subset).
        dataset_classes: the data set's classes.
        use_labels: whether the data set's labels are the task's (else: logits only, no accuracy).
        feeds: ``{id(item): TaskFeed}``, the task's index in each model.
    """

    position: int
    ckpt: object
    name: str
    dataset: str
    ds: object
    dataset_classes: int
    use_labels: bool
    feeds: dict


def verify_multitask(ckpts, loaded: Sequence[LoadedArtifact], settings: VerifySettings | None = None, *,
                     tol: Tolerances | None = None, strict: bool = True, log=None,
                     t_start: float | None = None) -> MultiTaskVerifyResult:
    """Verify multi-task models task by task against each task's own PyTorch model, then on mixed batches.

    Called by :func:`atexport.verify.verify` (which reads the artifacts and resolves the tolerances).

    Args:
        ckpts: one checkpoint (path or loaded) per task to verify; any subset of the models' tasks.
        loaded: the multi-task models, read with :func:`~atexport.runtime.artifacts.read_artifact`.
        settings: as for :func:`~atexport.verify.verify`; ``dataset``: one data set for every task (accuracy is
            then reported only for tasks with its class count; the logits are compared for all), or one per
            checkpoint, in order; ``mixed_images``: images per task in the mixed-batch check (the first of each
            task's images).
        tol: the resolved tolerances (default: those of ``settings``).
        strict: raise :class:`~atexport.errors.ParityError` on any failure (after the report is written).
        log: optional callable receiving progress lines.
        t_start: when the run started (``time.perf_counter()``; default: now).

    Raises:
        BadInputError: ``per_block`` (single-task models only), a data set count that fits neither rule,
            a per-task data set with another class count than its task.
        IncompatibleCheckpointError: a checkpoint that is not a task of a model (see :func:`match_tasks`),
            another backbone or preprocessing.
        ParityError: with ``strict``, any task, model or mixed batch outside tolerance.
    """
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.utils.machine import describe_machine

    s = settings or VerifySettings()
    say = log or (lambda *_: None)
    t_start = time.perf_counter() if t_start is None else t_start
    tol = resolve_tolerances(s.tolerances, s.overrides) if tol is None else tol
    if s.per_block:
        raise BadInputError(
            "--per-block compares single-task models block by block; to locate a multi-task model's error, export "
            "the failing task alone ('atexport onnx --ckpt TASK.pt') and run --per-block on that."
        )
    ckpts = [ck if isinstance(ck, Checkpoint) else load_checkpoint(ck) for ck in ckpts]
    entries = _match(ckpts, loaded, tol)
    tasks = _tasks(ckpts, loaded, entries, s, say)
    result = MultiTaskVerifyResult(split=s.split, batch_size=int(s.batch_size), tolerances=tol.to_dict(),
                                   machine=describe_machine(), models=[_model_entry(i) for i in loaded])
    kept_x, kept_y = [], {}  # per task: its first images; per (model, task): that model's logits of them
    with activated([i.runner for i in loaded], s.threads):
        for task in tasks:
            x_keep, y_keep = _verify_task(result, task, loaded, s, tol, say)
            kept_x.append(x_keep)
            kept_y.update({(k, task.position): y for k, y in y_keep.items()})
        result.seconds["tasks"] = time.perf_counter() - t_start
        labels = [t.name for t in tasks]
        for i in loaded:
            rows, note = _mixed_check(i, entries[id(i)], labels, kept_x, kept_y, int(s.batch_size), tol)
            result.mixed += rows
            if note:
                result.notes.append(note)
        result.seconds["mixed"] = time.perf_counter() - t_start - result.seconds["tasks"]
    return finish(result, s, strict, t_start)


# --------------------------------------------------------------------------------------------------
# Which task each checkpoint is, and its images


def _task_input(item: LoadedArtifact) -> str:
    """The name of the model's task-id input."""
    from atexport.artifact.bank import TASK_INPUT

    return str(((item.meta.extra or {}).get("task_input") or {}).get("name", TASK_INPUT))


def _pad_logit(item: LoadedArtifact) -> float:
    """The value of the model's padded logit columns."""
    from atexport.artifact.bank import PAD_LOGIT

    return float(((item.meta.extra or {}).get("multitask") or {}).get("pad_logit", PAD_LOGIT))


def _model_entry(item: LoadedArtifact) -> dict:
    """A model's line in the result: its file, backend, precision and tasks."""
    return {"path": str(item.artifact.path), "flag": item.artifact.flag, "backend": item.backend,
            "precision": item.precision, "name": item.name,
            "tasks": [t["name"] for t in sorted(item.meta.tasks, key=lambda t: t["index"])]}


def _match(ckpts: list, loaded: Sequence[LoadedArtifact], tol: Tolerances) -> dict[int, list[dict]]:
    """``{id(item): [the model's task entry of each checkpoint]}``, after every check; names the rows."""
    entries = {}
    for item in loaded:
        entries[id(item)] = match_tasks(item.meta, [ck.task_weights() for ck in ckpts], _where(item))
        for ck in ckpts:
            check_precision_and_preprocess(item, ck, tol)
    name_artifacts(loaded)
    return entries


def _datasets_per_task(datasets: Sequence[str], ckpts: Sequence) -> list[str]:
    if len(datasets) == 1:
        return [str(datasets[0])] * len(ckpts)
    if len(datasets) == len(ckpts):
        return [str(d) for d in datasets]
    raise BadInputError(
        f"{len(datasets)} data sets (--dataset) for {len(ckpts)} checkpoints (--ckpt): give one data set for all "
        "tasks, or one per --ckpt, in the same order."
    )


def _tasks(ckpts: list, loaded: Sequence[LoadedArtifact], entries: dict, s: VerifySettings, say) -> list[_Task]:
    """Each checkpoint's task: its name, its data set (loaded once per name; refused where the classes differ,
    unless one data set is shared by tasks of several class counts: logits only), how each model is given it."""
    from atexport.data import load_dataset, seeded_subset

    per_task_ds = _datasets_per_task(s.datasets, ckpts)
    shared = len(set(per_task_ds)) == 1 and len(ckpts) > 1 and len(s.datasets) == 1
    cache = {}
    for name in dict.fromkeys(per_task_ds):
        say(f"loading {name} ({s.split}) ...")
        cache[name] = load_dataset(name, s.split, data_dir=s.data_dir)
    out = []
    for p, (ck, name) in enumerate(zip(ckpts, per_task_ds)):
        ds, task = cache[name], entries[id(loaded[0])][p]["name"]
        ok = ds.num_classes == int(ck.model.num_classes)
        if not ok and not shared:
            how = ("verify each task on the data set it was trained for (--dataset once per --ckpt, in order), or "
                   "give one data set for all tasks to compare logits only" if len(ckpts) > 1
                   else "verify the task on the data set it was trained for")
            raise BadInputError(
                f"--dataset {name}: {ds.num_classes} classes, but task {task!r} (--ckpt {ck.path}) has "
                f"{ck.model.num_classes}; {how}."
            )
        feeds = {id(i): TaskFeed(int(entries[id(i)][p]["index"]), _task_input(i), _pad_logit(i)) for i in loaded}
        out.append(_Task(p, ck, task, name, seeded_subset(ds, int(s.limit) if s.limit else None, s.seed),
                         ds.num_classes, ok, feeds))
    return out


# --------------------------------------------------------------------------------------------------
# One task


def _verify_task(result: MultiTaskVerifyResult, task: _Task, loaded: Sequence[LoadedArtifact], s: VerifySettings,
                 tol: Tolerances, say) -> tuple[np.ndarray, dict]:
    """Stream one task's images through its PyTorch model and every model (``task_id`` = the task), probe its
    first images; adds the task's rows (and probes, notes) to ``result``. Returns the first images and each
    model's logits of them (``{id(item): logits}``), for the mixed-batch check."""
    from atexport.checkpoint import build_model
    from atexport.runtime.torch import TorchRunner
    from atexport.verify.probes import check_probes  # the family's diagnostics (Adapter-X: routing)

    ck, ds = task.ckpt, task.ds
    say(f"task {task.name}: building its PyTorch model from {ck.path}, running {len(ds)} images ...")
    model = build_model(ck, backbone_weights=s.backbone_weights)
    c = int(ck.model.num_classes)
    with TorchRunner(model, name="pytorch") as reference:
        p = run_pass(ds, ck.preprocess, reference, loaded, s.batch_size, keep=int(s.mixed_images),
                     feeds=task.feeds, classes=c)
    x_keep = p.kept
    feeds = {k: {f.input_name: f.ids(len(x_keep))} for k, f in task.feeds.items()}
    result.probes += check_probes(ck.adapter, model, loaded, x_keep, s.threads, feeds=lambda i: feeds[id(i)],
                                  task=task.name)  # the task's first images; every model fed its task id
    del model
    accuracy = label_accuracy(ds.targets) if task.use_labels else (lambda y: None)
    tv = TaskVerify(
        task=task.name, checkpoint=str(ck.path), dataset=task.dataset, samples=p.samples,
        indices={str(i.artifact.path): task.feeds[id(i)].index for i in loaded},
        reference=reference_row(p, accuracy), preprocess=preprocess_check(p, tol),
        backends=[backend_row(p, i, tol, accuracy, task=task.name) for i in loaded],
    )
    if not task.use_labels:
        tv.accuracy_note = (f"{task.dataset} has {task.dataset_classes} classes, task {task.name} {c}: "
                            "logits compared, accuracy not measured")
        result.notes.append(f"task {task.name}: {tv.accuracy_note} (give --dataset once per --ckpt for accuracy).")
    result.tasks.append(tv)
    return x_keep, {id(i): p.outputs[id(i)][: len(x_keep)] for i in loaded}


# --------------------------------------------------------------------------------------------------
# Mixed batches


def _mixed_check(item, entries, labels, kept_x, kept_y, bs, tol) -> tuple[list[MixedRow], str | None]:
    """Interleave the verified tasks' images in one batch; each row must equal the model's single-task row."""
    idx = [int(e["index"]) for e in entries]
    others = [int(t["index"]) for t in sorted(item.meta.tasks, key=lambda t: t["index"]) if int(t["index"]) not in idx]
    if len(idx) == 1 and not others:
        return [], f"{item.artifact.path}: one task, so no mixed-task batch to check."
    xs, ids, src = [], [], []
    for j in range(max(len(x) for x in kept_x)):
        for p, x in enumerate(kept_x):
            if j < len(x):
                xs.append(x[j])
                ids.append(idx[p])
                src.append((p, j))
        if len(idx) == 1:  # one task verified: its every neighbour is another task of the model
            xs.append(kept_x[0][j % len(kept_x[0])])
            ids.append(others[j % len(others)])
            src.append(None)
    x, ids = np.stack(xs), np.asarray(ids, dtype=np.int64)
    b, fixed = batch_of(item, bs)
    b = max(2, b) if not fixed else b  # a batch of one mixes nothing
    y, _ = run_logits(item.runner, x, b, fixed, ids, _task_input(item))
    in_batch = [labels[p] for p in range(len(idx))] + [
        t["name"] for t in item.meta.tasks if len(idx) == 1 and int(t["index"]) in others]
    rows = []
    for p, task in enumerate(labels):
        sel = [k for k, s in enumerate(src) if s is not None and s[0] == p]
        order = [src[k][1] for k in sel]
        single = kept_y[(id(item), p)][order]
        c = single.shape[1]
        got = y[sel]
        parity = compare(single, got[:, :c], tol.logits[MIXED_TOLERANCE], name=f"{item.name} mixed [{task}]")
        why = pad_failure(got, c, _pad_logit(item))
        if why:
            parity.failures.append(why)
        rows.append(MixedRow(item.name, item.backend, item.precision, str(item.artifact.path), task, b, in_batch,
                             parity))
    return rows, None
