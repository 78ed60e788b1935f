"""Running one task of a multi-task model through any runner, and selecting its tasks per sample.

A multi-task model takes a per-sample ``task_id`` next to the image batch and pads its logits to the
widest task (:mod:`atexport.artifact.bank`). :class:`TaskRunner` wraps a runner of such a model so it
looks like a single-task model: it feeds the task ids and cuts the padding off, so parity, verify and
bench compare it with a task's own model without knowing about banks.
"""

from __future__ import annotations

import numpy as np

from atexport.artifact.bank import TASK_INPUT, task_input
from atexport.runtime.base import Runner


class TaskRunner(Runner):
    """Runs a multi-task model through another runner with given task ids, returning that task's logits.

    The wrapped runner is activated on demand and left as it is on exit (its owner closes it), so one
    session serves several TaskRunners.

    Args:
        runner: a runner of the multi-task model (ONNX Runtime, TensorRT, OpenVINO, PyTorch).
        task: a task index (every sample that task), or per-sample ids (an int array of the batch's length,
            fed unchanged on every call).
        num_classes: the task's class count (columns kept); ``None`` keeps all.
        input_name: name of the task input.
    """

    def __init__(self, runner: Runner, task, num_classes: int | None = None, input_name: str = TASK_INPUT,
                 name: str | None = None):
        super().__init__()
        self.runner, self.num_classes, self.input_name = runner, num_classes, input_name
        if np.ndim(task) == 0:
            self.index, self.ids = int(task), None
        else:
            self.index, self.ids = None, np.ascontiguousarray(task, dtype=np.int64)
        label = f"task {self.index}" if self.ids is None else "mixed"
        self.name = name or f"{getattr(runner, 'name', 'runner')}[{label}]"

    def _activate(self):
        self.runner.activate()

    def _infer(self, batch, **feeds):
        ids = self.ids if self.ids is not None else np.full((len(batch),), self.index, dtype=np.int64)
        y = self.runner.infer(batch, **{self.input_name: ids}, **feeds)
        return y if self.num_classes is None else np.ascontiguousarray(y[:, : self.num_classes])


def task_runners(meta, runner: Runner) -> list[tuple[dict, TaskRunner]]:
    """One :class:`TaskRunner` per task of ``meta`` over ``runner``: ``[(task entry, runner), ...]``."""
    name, _ = task_input(meta) or (TASK_INPUT, 0)
    return [
        (t, TaskRunner(runner, t["index"], t["num_classes"], name, name=f"{getattr(runner, 'name', 'runner')}[{t['name']}]"))
        for t in sorted(meta.tasks, key=lambda t: t["index"])
    ]
