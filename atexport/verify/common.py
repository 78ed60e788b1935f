"""What single- and multi-task verification share: a backend's result row, running artifacts in chunks, and the
checks every artifact passes before it is run (its precision has tolerances, its preprocessing is the checkpoint's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.parity.compare import ParityResult
from atexport.parity.tolerances import Tolerances
from atexport.runtime.artifacts import LoadedArtifact


@dataclass
class BackendResult:
    """The numbers of one backend over the data set.

    Attributes:
        name: row label, e.g. ``onnxruntime int8``.
        backend: ``pytorch``, ``onnxruntime``, ``openvino`` or ``tensorrt``.
        precision: what ran: ``fp32``, ``fp16``, ``int8``; OpenVINO also ``bf16``, ``int8+bf16``.
        path: the artifact (``None`` for PyTorch).
        samples: images run.
        accuracy: top-1 accuracy against the labels.
        images_per_s: throughput of the inference calls alone (no decoding or preprocessing).
        parity: logits against PyTorch's, with the tolerance applied (``None`` for PyTorch itself).
    """

    name: str
    backend: str
    precision: str
    path: str | None
    samples: int
    accuracy: float
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



def run_logits(runner, x: np.ndarray, batch: int, fixed: bool, ids: np.ndarray | None = None,
         id_name: str = "task_id") -> tuple[np.ndarray, float]:
    """Logits of ``x`` in chunks of ``batch`` (fixed-batch models: padded, then trimmed) and the seconds spent
    in the runner; ``ids``: per-sample task ids, fed as ``id_name`` (multi-task models)."""
    from atexport.runtime.batching import run_batched

    spent: list[float] = []
    per_sample = None if ids is None else {id_name: np.ascontiguousarray(ids, dtype=np.int64)}
    y = run_batched(runner, x, batch, pad=fixed, per_sample=per_sample, timings=spent)
    return y, float(sum(spent))


# --------------------------------------------------------------------------------------------------
# verify()


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
