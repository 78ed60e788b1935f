"""What a benchmark of multi-task models runs: one task or mixed batches (:class:`TaskPlan`), and the PyTorch
baseline of a mixed batch (each task's own model on its share, :class:`_TasksOneByOne`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atexport.errors import BadInputError
from atexport.runtime.base import Runner


class _TasksOneByOne(Runner):
    """The PyTorch baseline of a mixed-task batch: each task's own model on its share of the batch, in turn."""

    def __init__(self, runners, ids: np.ndarray, pad: float):
        super().__init__()
        self.runners, self.pad = list(runners), pad
        self.rows = [np.flatnonzero(ids == k) for k in range(len(self.runners))]
        self.name = "pytorch"

    def _activate(self):
        for r in self.runners:
            r.activate()

    def _infer(self, batch, **feeds):
        outs = [(rows, r.infer(batch[rows], **feeds)) for r, rows in zip(self.runners, self.rows) if len(rows)]
        y = np.full((len(batch), max(o.shape[1] for _, o in outs)), self.pad, dtype=np.float32)
        for rows, o in outs:
            y[rows, : o.shape[1]] = o
        return y


@dataclass
class TaskPlan:
    """What a benchmark of multi-task models runs: one task, or mixed batches of several.

    Attributes:
        mode: ``task`` (every sample the same task) or ``mixed`` (task ids interleaved ``0 1 2 0 1 2 ...``).
        names: the tasks, in the order of ``positions``.
        positions: the checkpoints (indices into the given list) of those tasks: their PyTorch models are
            the baseline (one by one on their shares of a mixed batch).
        indices: ``{id(loaded artifact): [task index in that model, per task]}``.
        input_names: ``{id(loaded artifact): name of its task id input}``.
    """

    mode: str
    names: list[str]
    positions: list[int]
    indices: dict
    input_names: dict

    def ids(self, batch: int) -> np.ndarray:
        """Task positions (0..K-1) of the samples of a batch: round-robin, consecutive samples differ."""
        from atexport.artifact.bank import mixed_task_ids

        return mixed_task_ids(batch, len(self.positions))

    @property
    def label(self) -> str:
        return f" [{self.names[0]}]" if self.mode == "task" else f" [mixed, {len(self.names)} tasks]"

    @property
    def row_task(self) -> str:
        return self.names[0] if self.mode == "task" else "mixed"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "tasks": self.names,
                "task_ids": "every sample the same task" if self.mode == "task" else
                "round-robin over the tasks: 0 1 2 ... K-1 0 1 ... (index into 'tasks')",
                "baseline": "the task's own PyTorch model" if self.mode == "task" else
                "each task's own PyTorch model on its share of the batch, one after another"}


def task_plan(loaded, ckpts, task: str | None = None, mixed: bool = False) -> TaskPlan:
    """Which tasks of multi-task models to time, and the checkpoints of their PyTorch baselines.

    Raises:
        BadInputError: both or neither of ``task`` and ``mixed`` (with several checkpoints), an unknown task,
            a task without its checkpoint, ``mixed`` with one checkpoint.
        IncompatibleCheckpointError: a checkpoint that is not a task of a model.
    """
    from atexport.artifact.bank import TASK_INPUT
    from atexport.artifact.fit import match_tasks

    if task is not None and mixed:
        raise BadInputError("--task and --mixed: choose one (a task's own batches, or batches mixing the tasks).")
    tasks = [ck.task_weights() for ck in ckpts]
    entries = {id(i): match_tasks(i.meta, tasks, f"{i.artifact.flag} {i.artifact.path}") for i in loaded}
    first = loaded[0]
    names = [e["name"] for e in entries[id(first)]]
    where = f"{first.artifact.flag} {first.artifact.path}"
    if mixed:
        if len(ckpts) < 2:
            raise BadInputError(
                "--mixed times batches mixing several tasks; give the checkpoint of each (--ckpt A --ckpt B ...), "
                "whose PyTorch models are the baseline."
            )
        positions = list(range(len(ckpts)))
    elif task is not None:
        if task not in names:
            held = [t["name"] for t in sorted(first.meta.tasks, key=lambda t: t["index"])]
            if task in held:
                raise BadInputError(f"--task {task}: give its checkpoint with --ckpt (its PyTorch model is the "
                                    f"baseline); the given ones are tasks {names}.")
            raise BadInputError(f"--task {task}: {where} has no such task; it has {held}.")
        positions = [names.index(task)]
    elif len(ckpts) == 1:
        positions = [0]
    else:
        raise BadInputError(
            f"{where} is a multi-task model and {len(ckpts)} checkpoints were given: time one task with --task NAME "
            f"(one of {names}) or batches mixing them with --mixed."
        )
    return TaskPlan(
        mode="mixed" if mixed else "task",
        names=[names[p] for p in positions],
        positions=positions,
        indices={id(i): [int(entries[id(i)][p]["index"]) for p in positions] for i in loaded},
        input_names={id(i): str(((i.meta.extra or {}).get("task_input") or {}).get("name", TASK_INPUT))
                     for i in loaded},
    )
