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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from atexport.artifact.fit import match_tasks
from atexport.errors import BadInputError, ParityError
from atexport.parity.compare import ParityResult, compare
from atexport.parity.tolerances import Tolerances
from atexport.runtime.artifacts import LoadedArtifact
from atexport.verify.common import BackendResult, check_precision_and_preprocess, name_artifacts, run_logits

MIXED_TOLERANCE = "fp32"
"""The tolerance of the mixed-batch check at every precision: a row's logits must not depend on the other
rows of its batch, so a mixed batch against the same model's single-task batches is float32 rounding."""


# --------------------------------------------------------------------------------------------------
# Which task a checkpoint is


def _where(item: LoadedArtifact) -> str:
    return f"{item.artifact.flag} {item.artifact.path}"


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class TaskVerify:
    """One task: its PyTorch reference and every model's rows for it.

    Attributes:
        task: the task's name (in the first model).
        checkpoint: its checkpoint.
        dataset: the data set it was verified on.
        samples: images run.
        indices: ``{model path: the task's index there}``.
        reference: PyTorch FP32 (the task's own model) on timm's transform.
        backends: every model with ``task_id`` = this task, against ``reference``.
        preprocess: the torch-free preprocessing against timm's transform on these images.
        accuracy_note: why accuracy is not reported (a data set shared by tasks with other class counts).
    """

    task: str
    checkpoint: str
    dataset: str
    samples: int
    indices: dict
    reference: BackendResult
    backends: list[BackendResult] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)
    accuracy_note: str | None = None

    def to_dict(self) -> dict:
        return {"task": self.task, "checkpoint": self.checkpoint, "dataset": self.dataset, "samples": self.samples,
                "indices": self.indices, "accuracy_note": self.accuracy_note, "reference": self.reference.to_dict(),
                "backends": [b.to_dict() for b in self.backends], "preprocess": self.preprocess}


@dataclass
class MixedRow:
    """One task's rows of a model's mixed-task batches against the same model's single-task rows."""

    name: str
    backend: str
    precision: str
    path: str
    task: str
    batch_size: int
    tasks_in_batch: list
    parity: ParityResult

    @property
    def passed(self) -> bool:
        return self.parity.passed

    def to_dict(self) -> dict:
        return {"name": self.name, "backend": self.backend, "precision": self.precision, "path": self.path,
                "task": self.task, "batch_size": self.batch_size, "tasks_in_batch": self.tasks_in_batch,
                "parity": self.parity.to_dict(), "passed": self.passed}


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2%}"


@dataclass
class MultiTaskVerifyResult:
    """Everything :func:`verify_multitask` measured; ``require_passed`` turns failures into a ParityError."""

    split: str
    batch_size: int
    models: list[dict]
    tasks: list[TaskVerify] = field(default_factory=list)
    mixed: list[MixedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerances: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    reports: dict = field(default_factory=dict)
    per_block: list = field(default_factory=list)  # not run on multi-task models; kept for the CLI
    probes: list = field(default_factory=list)  # family diagnostics per task (verify/probes.py), e.g. routing

    @property
    def passed(self) -> bool:
        return (all(b.passed for t in self.tasks for b in t.backends) and all(m.passed for m in self.mixed)
                and all(t.preprocess.get("passed", True) for t in self.tasks)
                and all(p.get("passed", True) for p in self.probes))

    @property
    def samples(self) -> int:
        return sum(t.samples for t in self.tasks)

    def headline(self) -> str:
        """The line the CLI prints above the table."""
        models = ", ".join(Path(m["path"]).name for m in self.models)
        tasks = ", ".join(f"{t.task} ({t.dataset}, {t.samples} images)" for t in self.tasks)
        return f"multi-task {models}, {self.split} split: {tasks}"

    def failures(self) -> list[str]:
        """One line per failure: which backend, which task, which file, by how much."""
        out = []
        for t in self.tasks:
            pp = t.preprocess
            if not pp.get("passed", True):
                out.append(f"preprocessing [{t.task}]: the torch-free preprocessing differs from timm's eval transform "
                           f"by {pp['max_abs']:.3g} (tolerance {pp['tolerance']:g})")
            for b in t.backends:
                if not b.passed:
                    out.append(f"{b.name} [{t.task}] ({b.path}): " + "; ".join(b.parity.failures))
        for m in self.mixed:
            if not m.passed:
                out.append(f"{m.name} mixed-task batch [{m.task}] ({m.path}): " + "; ".join(m.parity.failures)
                           + " (against the same model's single-task rows)")
        from atexport.verify.probes import probe_label

        out += [f"{p['title']} ({probe_label(p)}, {p['artifact']}): {p['summary']}" for p in self.probes
                if not p.get("passed", True)]
        return out

    def table(self) -> str:
        """The terminal tables: per task, then mixed batches."""
        tw = max([4, *[len(t.task) for t in self.tasks]])
        bw = max([26, *[len(b.name) for t in self.tasks for b in t.backends]])
        head = (f"{'task':<{tw}} {'backend':<{bw}} {'n':>5} {'top-1':>7} {'agree':>7} {'max abs':>9} {'mean abs':>9} "
                f"{'min cos':>9} {'img/s':>8}  result")
        lines = [head, "-" * len(head)]
        for t in self.tasks:
            for b in [t.reference, *t.backends]:
                p = b.parity
                cells = (f"{p.max_abs:>9.3g} {p.mean_abs:>9.3g} {p.min_cosine:>9.6f}" if p
                         else f"{'-':>9} {'-':>9} {'-':>9}")
                verdict = "reference" if p is None else ("ok" if p.passed else "FAIL: " + "; ".join(p.failures))
                lines.append(f"{t.task:<{tw}} {b.name:<{bw}} {b.samples:>5} {_pct(b.accuracy):>7} {b.agreement:>7.1%} "
                             f"{cells} {b.images_per_s:>8.1f}  {verdict}")
            pp = t.preprocess
            lines.append(f"{t.task:<{tw}} preprocessing (numpy/Pillow vs timm): max abs {pp['max_abs']:.3g}, tolerance "
                         f"{pp['tolerance']:g}: {'ok' if pp['passed'] else 'FAIL'}")
        if self.mixed:
            lines += ["", "mixed-task batches: each task's rows against the same model's single-task rows"]
            head = f"{'task':<{tw}} {'backend':<{bw}} {'rows':>5} {'batch':>5} {'max abs':>9} {'min cos':>9}  result"
            lines += [head, "-" * len(head)]
            for m in self.mixed:
                p = m.parity
                verdict = "ok" if p.passed else "FAIL: " + "; ".join(p.failures)
                lines.append(f"{m.task:<{tw}} {m.name:<{bw}} {p.samples:>5} {m.batch_size:>5} {p.max_abs:>9.3g} "
                             f"{p.min_cosine:>9.6f}  {verdict}")
        if self.probes:
            from atexport.verify.probes import probe_lines

            lines += ["", "family diagnostics: each task's first images, its PyTorch model against each model"]
            lines += probe_lines(self.probes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "multitask": True,
            "models": self.models,
            "split": self.split,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "passed": self.passed,
            "failures": self.failures(),
            "tasks": [t.to_dict() for t in self.tasks],
            "mixed": [m.to_dict() for m in self.mixed],
            "probes": self.probes,
            "notes": self.notes,
            "tolerances": self.tolerances,
            "machine": self.machine,
            "seconds": self.seconds,
        }

    def require_passed(self) -> None:
        """Raise :class:`ParityError` naming every failing backend, task and file, and by how much."""
        if self.passed:
            return
        lines = ["verification failed:"] + [f"  {f}" for f in self.failures()]
        if self.reports:
            lines.append("  report: " + ", ".join(str(p) for p in self.reports.values()))
        err = ParityError("\n".join(lines))
        err.result = self
        raise err


# --------------------------------------------------------------------------------------------------
# verify_multitask()


def _datasets_per_task(datasets: Sequence[str], ckpts: Sequence) -> list[str]:
    if len(datasets) == 1:
        return [str(datasets[0])] * len(ckpts)
    if len(datasets) == len(ckpts):
        return [str(d) for d in datasets]
    raise BadInputError(
        f"{len(datasets)} data sets (--dataset) for {len(ckpts)} checkpoints (--ckpt): give one data set for all "
        "tasks, or one per --ckpt, in the same order."
    )


def _pad_failure(y_full: np.ndarray, classes: int, pad: float) -> str | None:
    if y_full.shape[1] < classes:
        return f"the model gives {y_full.shape[1]} logits per row, fewer than the task's {classes} classes"
    if y_full.shape[1] > classes and not np.all(y_full[:, classes:] == np.float32(pad)):
        return f"padded logits are not {pad:g}"
    return None


def _batch_of(item: LoadedArtifact, bs: int) -> tuple[int, bool]:
    """Chunk size and whether chunks are padded to it (fixed-batch ONNX models), as single-task verify does."""
    b = item.batch if item.batch and (item.pads or item.batch < bs) else bs
    return b, item.pads


def verify_multitask(ckpts, loaded: Sequence[LoadedArtifact], *, datasets: Sequence[str], split: str = "test",
                     limit: int | None = None, data_dir=None, batch_size: int = 32, tol: Tolerances,
                     per_block: bool = False, report=None, backbone_weights=None, threads: int | None = None,
                     seed: int = 0, mixed_images: int = 64, strict: bool = True, say=None,
                     t_start: float | None = None) -> MultiTaskVerifyResult:
    """Verify multi-task models task by task against each task's own PyTorch model, then on mixed batches.

    Called by :func:`atexport.verify.verify` (which reads the artifacts and resolves the tolerances);
    the arguments are those of :func:`~atexport.verify.verify`.

    Args:
        ckpts: one checkpoint (path or loaded) per task to verify; any subset of the models' tasks.
        loaded: the multi-task models, read with :func:`~atexport.verify.verify.read_artifact`.
        datasets: one data set for every task (accuracy is then reported only for tasks with its class
            count; the logits are compared for all), or one per checkpoint, in order.
        mixed_images: images per task in the mixed-batch check (the first of each task's images).

    Raises:
        BadInputError: ``per_block`` (single-task models only), a data set count that fits neither rule,
            a per-task data set with another class count than its task.
        IncompatibleCheckpointError: a checkpoint that is not a task of a model (see :func:`match_tasks`),
            another backbone or preprocessing.
        ParityError: with ``strict``, any task, model or mixed batch outside tolerance.
    """
    from atexport.utils.machine import describe_machine
    from atexport.checkpoint import Checkpoint, build_model, load_checkpoint
    from atexport.data import eval_transform, load_dataset, seeded_subset
    from atexport.artifact.bank import PAD_LOGIT, TASK_INPUT
    from atexport.runtime.preprocess import Preprocessor
    from atexport.runtime.torch import TorchRunner

    say = say or (lambda *_: None)
    t_start = time.perf_counter() if t_start is None else t_start
    if per_block:
        raise BadInputError(
            "--per-block compares single-task models block by block; to locate a multi-task model's error, export "
            "the failing task alone ('atexport onnx --ckpt TASK.pt') and run --per-block on that."
        )
    if int(mixed_images) < 1:
        raise BadInputError(f"mixed_images {mixed_images}: must be at least 1.")
    ckpts = [ck if isinstance(ck, Checkpoint) else load_checkpoint(ck) for ck in ckpts]
    per_task_ds = _datasets_per_task(datasets, ckpts)
    shared = len(set(per_task_ds)) == 1 and len(ckpts) > 1 and len(datasets) == 1
    entries = {}  # id(item) -> [task entry per checkpoint]
    for item in loaded:
        entries[id(item)] = match_tasks(item.meta, [ck.task_weights() for ck in ckpts], _where(item))
        for ck in ckpts:
            check_precision_and_preprocess(item, ck, tol)
    name_artifacts(loaded)
    first = loaded[0]
    labels = [e["name"] for e in entries[id(first)]]
    pads = {id(i): float(((i.meta.extra or {}).get("multitask") or {}).get("pad_logit", PAD_LOGIT)) for i in loaded}
    id_names = {id(i): str(((i.meta.extra or {}).get("task_input") or {}).get("name", TASK_INPUT)) for i in loaded}

    cache, subsets, notes = {}, [], []
    for name in dict.fromkeys(per_task_ds):
        say(f"loading {name} ({split}) ...")
        cache[name] = load_dataset(name, split, data_dir=data_dir)
    use_labels = []
    for ck, name, task in zip(ckpts, per_task_ds, labels):
        ds = cache[name]
        ok = ds.num_classes == int(ck.model.num_classes)
        if not ok and not shared:
            how = ("verify each task on the data set it was trained for (--dataset once per --ckpt, in order), or "
                   "give one data set for all tasks to compare logits only" if len(ckpts) > 1
                   else "verify the task on the data set it was trained for")
            raise BadInputError(
                f"--dataset {name}: {ds.num_classes} classes, but task {task!r} (--ckpt {ck.path}) has "
                f"{ck.model.num_classes}; {how}."
            )
        use_labels.append(ok)
        subsets.append(seeded_subset(ds, int(limit) if limit else None, seed))

    result = MultiTaskVerifyResult(
        split=split, batch_size=int(batch_size), tolerances=tol.to_dict(), machine=describe_machine(), notes=notes,
        models=[{"path": str(i.artifact.path), "flag": i.artifact.flag, "backend": i.backend, "precision": i.precision,
                 "name": i.name, "tasks": [t["name"] for t in sorted(i.meta.tasks, key=lambda t: t["index"])]}
                for i in loaded],
    )
    import torch

    bs = int(batch_size)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))  # the same thread count for PyTorch and ONNX Runtime
    for i in loaded:
        i.runner.activate()  # fails here, before any work, when a backend is missing (e.g. TensorRT)
    kept_x, kept_y = [], {}  # per task: its first images; per (model, task): that model's logits of them
    from atexport.verify.probes import check_probes  # the family's diagnostics (Adapter-X: routing)

    try:
        for p, ck in enumerate(ckpts):
            task, ds = labels[p], subsets[p]
            say(f"task {task}: building its PyTorch model from {ck.path}, running {len(ds)} images ...")
            model = build_model(ck, backbone_weights=backbone_weights)
            reference = TorchRunner(model, name="pytorch").activate()
            rows = _verify_task(ds, ck, reference, loaded, entries, p, bs, id_names, pads,
                                eval_transform(ck.preprocess), Preprocessor(ck.preprocess), int(mixed_images))
            reference.deactivate()
            ref, outs, spent, pre_max, x_keep, pt_time, pad_fail = rows
            ids = {id(i): {id_names[id(i)]: np.full(len(x_keep), entries[id(i)][p]["index"], np.int64)} for i in loaded}
            result.probes += check_probes(ck.adapter, model, loaded, x_keep, threads, feeds=lambda i: ids[id(i)],
                                          task=task)  # the task's first images; every model fed its task id
            del model
            n, c = len(ds), int(ck.model.num_classes)
            targets = np.asarray(ds.targets, dtype=np.int64)
            acc = (lambda y: float((y.argmax(1) == targets).mean())) if use_labels[p] else (lambda y: None)
            tv = TaskVerify(
                task=task, checkpoint=str(ck.path), dataset=per_task_ds[p], samples=n,
                indices={str(i.artifact.path): int(entries[id(i)][p]["index"]) for i in loaded},
                reference=BackendResult("pytorch fp32 (reference)", "pytorch", "fp32", None, n, acc(ref),
                                        n / max(pt_time, 1e-9), pt_time),
                preprocess={"max_abs": pre_max, "tolerance": tol.preprocess_max_abs, "images": n,
                            "passed": bool(pre_max <= tol.preprocess_max_abs)},
            )
            if not use_labels[p]:
                tv.accuracy_note = (f"{per_task_ds[p]} has {cache[per_task_ds[p]].num_classes} classes, task {task} "
                                    f"{c}: logits compared, accuracy not measured")
                notes.append(f"task {task}: {tv.accuracy_note} (give --dataset once per --ckpt for accuracy).")
            for i in loaded:
                y = outs[id(i)]
                parity = compare(ref, y, tol.logits[i.tolerance], name=f"{i.name} [{task}]")
                if pad_fail.get(id(i)):
                    parity.failures.append(pad_fail[id(i)])
                tv.backends.append(BackendResult(i.name, i.backend, i.precision, str(i.artifact.path), n, acc(y),
                                                 n / max(spent[id(i)], 1e-9), spent[id(i)], parity))
                kept_y[(id(i), p)] = y[: len(x_keep)]
            kept_x.append(x_keep)
            result.tasks.append(tv)
        result.seconds["tasks"] = time.perf_counter() - t_start
        for i in loaded:
            rows, note = _mixed_check(i, entries[id(i)], labels, kept_x, kept_y, bs, tol, id_names[id(i)], pads[id(i)])
            result.mixed += rows
            if note:
                notes.append(note)
        result.seconds["mixed"] = time.perf_counter() - t_start - result.seconds["tasks"]
    finally:
        torch.set_num_threads(prev_threads)
        for i in loaded:
            i.runner.deactivate()
    result.seconds["total"] = time.perf_counter() - t_start
    if report is not None:
        from atexport.verify.report import write_verify_report

        result.reports = write_verify_report(result, report)
    if strict:
        result.require_passed()
    return result


def _verify_task(ds, ck, reference, loaded, entries, p, bs, id_names, pads, timm_tf, pre, keep):
    """Stream one task's images through its PyTorch model and every model (``task_id`` = the task)."""
    n = len(ds)
    c = int(ck.model.num_classes)
    ref_logits, pt_time = [], 0.0
    outs = {id(i): [] for i in loaded}
    spent = {id(i): 0.0 for i in loaded}
    pad_fail = {}
    pre_max, kept, warm = 0.0, [], False
    chunk = max(bs, *[i.batch or 0 for i in loaded])
    for start in range(0, n, chunk):
        imgs = [ds.load(k) for k in range(start, min(start + chunk, n))]
        x_pt = np.stack([timm_tf(im).numpy() for im in imgs]).astype(np.float32)
        x_rt = pre(imgs)
        pre_max = max(pre_max, float(np.abs(x_pt - x_rt).max()))
        if sum(len(k) for k in kept) < keep:
            kept.append(x_rt[: keep - sum(len(k) for k in kept)])
        if not warm:  # untimed: first calls allocate, pick kernels, build ORT's caches
            warm = True
            reference.infer(x_pt[: min(bs, len(x_pt))])
            for i in loaded:
                b, fixed = _batch_of(i, bs)
                xw = x_rt[: (b if fixed else min(b, len(x_rt)))]
                run_logits(i.runner, xw, b, fixed, np.full(len(xw), entries[id(i)][p]["index"], np.int64), id_names[id(i)])
        y, t = run_logits(reference, x_pt, bs, False)
        ref_logits.append(y)
        pt_time += t
        for i in loaded:
            b, fixed = _batch_of(i, bs)
            ids = np.full(len(x_rt), entries[id(i)][p]["index"], np.int64)
            y, t = run_logits(i.runner, x_rt, b, fixed, ids, id_names[id(i)])
            why = _pad_failure(y, c, pads[id(i)])
            if why:
                pad_fail.setdefault(id(i), why)
            outs[id(i)].append(y[:, :c])
            spent[id(i)] += t
    outs = {k: np.concatenate(v) for k, v in outs.items()}
    return np.concatenate(ref_logits), outs, spent, pre_max, np.concatenate(kept), pt_time, pad_fail


def _mixed_check(item, entries, labels, kept_x, kept_y, bs, tol, id_name, pad) -> tuple[list[MixedRow], str | None]:
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
    b, fixed = _batch_of(item, bs)
    b = max(2, b) if not fixed else b  # a batch of one mixes nothing
    y, _ = run_logits(item.runner, x, b, fixed, ids, id_name)
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
        why = _pad_failure(got, c, pad)
        if why:
            parity.failures.append(why)
        rows.append(MixedRow(item.name, item.backend, item.precision, str(item.artifact.path), task, b, in_batch,
                             parity))
    return rows, None
