"""The export stage: PyTorch checkpoint -> verified ONNX model (fused or with swappable task weights).

* :func:`export_onnx` (``atexport onnx``): rebuild, export with the pinned dynamo exporter, simplify,
  write metadata, check parity against PyTorch, write atomically.
* :func:`export_module`: the reusable exporter for any ``nn.Module``, with named tensors lifted to
  graph inputs (multi-task export builds on it); :func:`bind_initializers` gives them default values.
* :func:`swap_onnx` (``atexport swap``) and :class:`AdapterSession`: another task's adapters and head in
  a file or a live ONNX Runtime session, without re-exporting.

Importing this package pulls in neither torch nor onnx; the functions import them when called.
"""

from atexport.export.onnx import ExportResult, bind_initializers, export_module, export_onnx
from atexport.export.swap import AdapterSession, SwapResult, check_compatible, load_task_weights, swap_onnx

__all__ = [
    "AdapterSession",
    "ExportResult",
    "SwapResult",
    "bind_initializers",
    "check_compatible",
    "export_module",
    "export_onnx",
    "load_task_weights",
    "swap_onnx",
]
