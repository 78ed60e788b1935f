"""The runner interface shared by PyTorch, ONNX Runtime and TensorRT.

A runner is a context manager that touches its backend (loads the session, the engine, the GPU) only
when activated, and maps a float32 NCHW batch to float32 logits. Verification and benchmarks are
written once against this interface and compare any two runners.
"""

from __future__ import annotations

import numpy as np


class Runner:
    """Base class: ``with runner: logits = runner.infer(batch)``.

    Subclasses implement :meth:`_activate`, :meth:`_infer` and optionally :meth:`_deactivate`.
    """

    name = "runner"

    def __init__(self):
        self.is_active = False

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def infer(self, batch: np.ndarray, **feeds) -> np.ndarray:
        """Run one batch (float32, NCHW); extra named inputs (e.g. ``task_id``) go in ``feeds``."""
        if not self.is_active:
            self.activate()
        return self._infer(np.ascontiguousarray(batch, dtype=np.float32), **feeds)

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def _infer(self, batch: np.ndarray, **feeds) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"
