"""Multi-task ONNX models: one frozen backbone, a bank of K adapter sets and heads, mixed-task batches.

:func:`export_multitask` (``atexport onnx --ckpt a.pt --ckpt b.pt --multitask``) exports one model
holding the backbone once and, for every task, its adapters and head stacked along a leading *task
axis* (the *bank*). Inputs: ``input`` (the image batch, float32 NCHW) and ``task_id`` (int64 ``[N]``,
an index into ``metadata.tasks``, one per sample); output: ``logits`` ``[N, max_classes]``. Each row
holds its task's logits in its first ``tasks[i]["num_classes"]`` columns; the remaining columns are
exactly :data:`PAD_LOGIT` (-1e4: finite, exact in FP16, never an argmax or a softmax mass in
practice). Apps slice each row to its task's class count (the torch-free runtime does).

Layout (``gather``, measured in ``bench/RESULTS.md``): per sample, ``Gather(bank, task_id)`` picks the
task's ``[D, r]`` / ``[r, D]`` / ``[D, C]`` weights and a batched ``MatMul`` applies them, so every
sample costs exactly what it costs in a single-task model; computing all K adapters and selecting
would multiply the adapter work by K. The bank tensors are ordinary weights: graph inputs with
initializers of the same name (overridable initializers, see :mod:`atexport.export.onnx`), listed in
the metadata ``manifest`` with how a task's checkpoint tensor maps to its slice (transpose, padding).
The task axis is the symbolic dimension ``"tasks"`` and appears in no node, so :func:`add_task`,
:func:`remove_task` and replacing a task rewrite only the bank initializers and the metadata (no
re-tracing), and a TensorRT refit can replace one task's slice in place.

Every sample's logits equal its task's single-task export at float32 rounding: export checks this
(parity against each task's own PyTorch model, on mixed batches), and ``tests/test_multitask.py``
checks it against ``export_onnx`` of each checkpoint, in FP32, FP16 and INT8.

The package, one subject per module: :mod:`~atexport.export.multitask.modules` (the PyTorch bank
model; the adapter layer comes from the checkpoints' adapter family), :mod:`~.export` (export and
its per-task verification), :mod:`~.edit` (list, add, replace, remove tasks), :mod:`~.lock` (safe
concurrent in-place edits), :mod:`~.refit` (the bank tensors of a TensorRT refit).

All checkpoints must share the backbone (name, architecture overrides, fingerprint), the regime
(``adapter`` or ``head``), the adapter rank, placement (``every``) and scale ``alpha`` (baked into the
graph), and the preprocessing; anything else is refused with the files named.
"""

from __future__ import annotations

from atexport.export.multitask.edit import TaskEditResult, add_task, list_tasks, remove_task
from atexport.export.multitask.export import MultiTaskResult, multitask_path_for, export_multitask
from atexport.export.multitask.modules import build_multitask_model
from atexport.export.multitask.refit import read_banks, refit_banks

__all__ = [
    "MultiTaskResult",
    "TaskEditResult",
    "add_task",
    "build_multitask_model",
    "multitask_path_for",
    "export_multitask",
    "list_tasks",
    "read_banks",
    "refit_banks",
    "remove_task",
]

