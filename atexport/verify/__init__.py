"""Accuracy parity between artifacts: comparison of any two runners, tolerances per precision.

* :func:`verify` (``atexport verify``): every artifact and the PyTorch FP32 model over a labelled data
  set, with accuracy, agreement, logit differences, throughput and a JSON + Markdown report; how it runs
  (data set, batch, tolerances, extra checks) is one :class:`VerifySettings`;
* :func:`verify_multitask` (``verify`` of multi-task models): each task against its own PyTorch model,
  then mixed-task batches against the model's single-task rows;
* :func:`compare_blocks` (``--per-block``): where inside the network an ONNX artifact starts to differ;
* :func:`compare`, :class:`Tolerance`: the comparison of two logit arrays every stage uses.

Importing this package imports neither torch nor onnxruntime.
"""

from atexport.parity.compare import ParityResult, Tolerance, compare, format_table, load_tolerances
from atexport.parity.tolerances import resolve_tolerances
from atexport.runtime.artifacts import Artifact
from atexport.verify.multitask import verify_multitask
from atexport.verify.per_block import PerBlockResult, Stage, compare_blocks
from atexport.verify.result import BackendResult, MultiTaskVerifyResult, VerifyResult, VerifyResultBase
from atexport.verify.settings import VerifySettings
from atexport.verify.verify import verify

__all__ = [
    "Artifact",
    "BackendResult",
    "MultiTaskVerifyResult",
    "ParityResult",
    "PerBlockResult",
    "Stage",
    "Tolerance",
    "VerifyResult",
    "VerifyResultBase",
    "VerifySettings",
    "compare",
    "compare_blocks",
    "format_table",
    "load_tolerances",
    "resolve_tolerances",
    "verify",
    "verify_multitask",
]
