"""What ``atexport verify`` measured: one backend's row, and the results of single- and multi-task verification.

Both results share one base, :class:`VerifyResultBase`: its rows come in groups (one reference with the backends
compared to it, and the preprocessing check of the same images; one group for a single-task model, one per task
for a multi-task model), from which the verdict, the failure lines, the error of ``require_passed`` and the JSON
report follow alike. Each result adds only what differs: its headline, its table, its Markdown report
(:mod:`atexport.verify.report`) and the fields of its JSON head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from atexport.errors import ParityError
from atexport.parity.compare import ParityResult


@dataclass
class BackendResult:
    """The numbers of one backend over the data set.

    Attributes:
        name: row label, e.g. ``onnxruntime int8``.
        backend: ``pytorch``, ``onnxruntime``, ``openvino`` or ``tensorrt``.
        precision: what ran: ``fp32``, ``fp16``, ``int8``; OpenVINO also ``bf16``, ``int8+bf16``.
        path: the artifact (``None`` for PyTorch).
        samples: images run.
        accuracy: top-1 accuracy against the labels (``None`` where the labels are not the task's).
        images_per_s: throughput of the inference calls alone (no decoding or preprocessing).
        parity: logits against PyTorch's, with the tolerance applied (``None`` for PyTorch itself).
    """

    name: str
    backend: str
    precision: str
    path: str | None
    samples: int
    accuracy: float | None
    images_per_s: float
    seconds: float
    parity: ParityResult | None = None

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity.passed

    @property
    def agreement(self) -> float:
        return 1.0 if self.parity is None else self.parity.top1_agreement

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parity"] = self.parity.to_dict() if self.parity else None
        d["agreement"] = self.agreement
        d["passed"] = self.passed
        return d


class Rows(NamedTuple):
    """One group of rows: a reference, the backends compared with it, and the preprocessing check of its images."""

    task: str | None  # the task of a multi-task model; None for a single-task one
    reference: BackendResult
    backends: list[BackendResult]
    preprocess: dict


ROW_HEAD = (f"{'n':>5} {'top-1':>7} {'agree':>7} {'max abs':>9} {'mean abs':>9} {'min cos':>9} {'img/s':>8}  "
            "result")
"""The terminal table's columns after the row's name (single- and multi-task alike)."""


def row_cells(b: BackendResult) -> str:
    """The terminal table's cells of one row after its name, verdict included."""
    p = b.parity
    cells = f"{p.max_abs:>9.3g} {p.mean_abs:>9.3g} {p.min_cosine:>9.6f}" if p else f"{'-':>9} {'-':>9} {'-':>9}"
    verdict = "reference" if p is None else ("ok" if p.passed else "FAIL: " + "; ".join(p.failures))
    accuracy = "-" if b.accuracy is None else f"{b.accuracy:.2%}"
    return f"{b.samples:>5} {accuracy:>7} {b.agreement:>7.1%} {cells} {b.images_per_s:>8.1f}  {verdict}"


@dataclass
class VerifyResultBase:
    """What single- and multi-task results share; ``require_passed`` turns failures into a ParityError.

    Subclasses give their row groups (:meth:`groups`), any failures beyond them (:meth:`extra_failures`), the
    head and rows of their JSON report (:meth:`_head_dict`, :meth:`_rows_dict`), a headline, a table and a
    Markdown report.
    """

    split: str
    batch_size: int
    notes: list[str] = field(default_factory=list, kw_only=True)
    tolerances: dict = field(default_factory=dict, kw_only=True)
    machine: dict = field(default_factory=dict, kw_only=True)
    seconds: dict = field(default_factory=dict, kw_only=True)
    reports: dict = field(default_factory=dict, kw_only=True)
    per_block: list = field(default_factory=list, kw_only=True)  # single-task models only
    probes: list = field(default_factory=list, kw_only=True)  # family diagnostics (verify/probes.py), e.g. routing

    def groups(self) -> list[Rows]:
        """The row groups: one per reference model."""
        raise NotImplementedError

    def extra_failures(self) -> list[str]:
        """Failures of checks beyond the row groups (multi-task: mixed batches)."""
        return []

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        """One line per failure: which backend (and task), which file, by how much."""
        from atexport.verify.probes import probe_label

        out = []
        for g in self.groups():
            tag = f" [{g.task}]" if g.task else ""
            pp = g.preprocess
            if not pp.get("passed", True):
                out.append(f"preprocessing{tag}: the torch-free preprocessing differs from timm's eval transform by "
                           f"{pp['max_abs']:.3g} (tolerance {pp['tolerance']:g})")
            out += [f"{b.name}{tag} ({b.path}): " + "; ".join(b.parity.failures) for b in g.backends if not b.passed]
        out += self.extra_failures()
        out += [f"{p['title']} ({probe_label(p)}, {p['artifact']}): {p['summary']}" for p in self.probes
                if not p.get("passed", True)]
        return out

    def _head_dict(self) -> dict:
        raise NotImplementedError

    def _rows_dict(self) -> dict:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """Every number, as ``verify.json`` holds it."""
        return {**self._head_dict(), "passed": self.passed, "failures": self.failures(), **self._rows_dict(),
                "probes": self.probes, "notes": self.notes, "tolerances": self.tolerances, "machine": self.machine,
                "seconds": self.seconds}

    def require_passed(self) -> None:
        """Raise :class:`ParityError` naming every failing backend (and task) and by how much."""
        if self.passed:
            return
        lines = ["verification failed:"] + [f"  {f}" for f in self.failures()]
        backends = [b for g in self.groups() for b in g.backends]
        for r in self.per_block:
            if r.first_over or any(b.path == r.artifact and not b.passed for b in backends):
                lines.append(f"  per block: {r.summary()}")
        if self.reports:
            lines.append("  report: " + ", ".join(str(p) for p in self.reports.values()))
        err = ParityError("\n".join(lines))
        err.result = self
        raise err


@dataclass
class VerifyResult(VerifyResultBase):
    """Everything :func:`~atexport.verify.verify` measured on a single-task model."""

    checkpoint: str
    dataset: str
    samples: int
    reference: BackendResult
    backends: list[BackendResult] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)

    def groups(self) -> list[Rows]:
        return [Rows(None, self.reference, self.backends, self.preprocess)]

    def headline(self) -> str:
        """The line the CLI prints above the table."""
        return f"{self.dataset} {self.split}: {self.samples} images, checkpoint {self.checkpoint}"

    def table(self) -> str:
        """The terminal table."""
        from atexport.verify.probes import probe_lines

        head = f"{'backend':<26} {ROW_HEAD}"
        lines = [head, "-" * len(head)]
        lines += [f"{b.name:<26} {row_cells(b)}" for b in [self.reference, *self.backends]]
        pp = self.preprocess
        if pp:
            lines.append(
                f"preprocessing (numpy/Pillow vs timm): max abs {pp['max_abs']:.3g} on {pp['images']} images, "
                f"tolerance {pp['tolerance']:g}: {'ok' if pp['passed'] else 'FAIL'}"
            )
        return "\n".join(lines + probe_lines(self.probes))

    def markdown(self) -> str:
        """The Markdown report (``verify.md``)."""
        from atexport.verify.report import verify_markdown

        return verify_markdown(self)

    def _head_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "dataset": self.dataset, "split": self.split, "samples": self.samples,
                "batch_size": self.batch_size}

    def _rows_dict(self) -> dict:
        return {"reference": self.reference.to_dict(), "backends": [b.to_dict() for b in self.backends],
                "preprocess": self.preprocess, "per_block": [r.to_dict() for r in self.per_block]}


@dataclass
class TaskVerify:
    """One task of a multi-task model: its PyTorch reference and every model's rows for it.

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


@dataclass
class MultiTaskVerifyResult(VerifyResultBase):
    """Everything :func:`~atexport.verify.multitask.verify_multitask` measured: per task, then mixed batches."""

    models: list[dict]
    tasks: list[TaskVerify] = field(default_factory=list)
    mixed: list[MixedRow] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(t.samples for t in self.tasks)

    def groups(self) -> list[Rows]:
        return [Rows(t.task, t.reference, t.backends, t.preprocess) for t in self.tasks]

    def extra_failures(self) -> list[str]:
        return [f"{m.name} mixed-task batch [{m.task}] ({m.path}): " + "; ".join(m.parity.failures)
                + " (against the same model's single-task rows)" for m in self.mixed if not m.passed]

    def headline(self) -> str:
        """The line the CLI prints above the table."""
        models = ", ".join(Path(m["path"]).name for m in self.models)
        tasks = ", ".join(f"{t.task} ({t.dataset}, {t.samples} images)" for t in self.tasks)
        return f"multi-task {models}, {self.split} split: {tasks}"

    def table(self) -> str:
        """The terminal tables: per task, then mixed batches, then the family's diagnostics."""
        tw = max([4, *[len(t.task) for t in self.tasks]])
        bw = max([26, *[len(b.name) for t in self.tasks for b in t.backends]])
        head = f"{'task':<{tw}} {'backend':<{bw}} {ROW_HEAD}"
        lines = [head, "-" * len(head)]
        for t in self.tasks:
            lines += [f"{t.task:<{tw}} {b.name:<{bw}} {row_cells(b)}" for b in [t.reference, *t.backends]]
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

    def markdown(self) -> str:
        """The Markdown report (``verify.md``)."""
        from atexport.verify.report import multitask_markdown

        return multitask_markdown(self)

    def _head_dict(self) -> dict:
        return {"multitask": True, "models": self.models, "split": self.split, "samples": self.samples,
                "batch_size": self.batch_size}

    def _rows_dict(self) -> dict:
        return {"tasks": [t.to_dict() for t in self.tasks], "mixed": [m.to_dict() for m in self.mixed]}
