"""The export stage: PyTorch checkpoint -> verified ONNX model (fused or with swappable task weights).

* :class:`ExportSettings`: how to export (opset, batch, separable, simplifier, verify...), made once and
  passed to :func:`export_onnx` or :func:`export_multitask`.
* :func:`export_onnx` (``atexport onnx``): rebuild, export with the pinned dynamo exporter, simplify,
  write metadata, check parity against PyTorch, write atomically.
* :func:`export_module`: the reusable exporter for any ``nn.Module``, with named tensors lifted to
  graph inputs (multi-task export builds on it); :func:`bind_initializers` gives them default values.
* :func:`export_multitask` (``atexport onnx --multitask``): one backbone, a bank of task adapters and heads,
  a per-sample ``task_id``; :func:`add_task` / :func:`remove_task` / :func:`list_tasks` edit the bank.
* :func:`swap` / :func:`swap_onnx` (``atexport swap``): another task's adapters and head in a file or a
  refitted engine, without re-exporting (a live session: :class:`atexport.runtime.session.AdapterSession`).

Importing this package pulls in neither torch nor onnx; the functions import them when called.
"""

from atexport.export.onnx import ExportResult, bind_initializers, export_module, export_onnx
from atexport.export.settings import ExportSettings
from atexport.export.multitask import MultiTaskResult, add_task, export_multitask, list_tasks, remove_task
from atexport.export.swap import SwapResult, swap_onnx
from atexport.export.task_swap import swap

__all__ = [
    "ExportResult",
    "ExportSettings",
    "SwapResult",
    "bind_initializers",
    "MultiTaskResult",
    "add_task",
    "export_module",
    "export_multitask",
    "export_onnx",
    "list_tasks",
    "remove_task",
    "swap",
    "swap_onnx",
]
