"""ExecuTorch runner: a ``.pte`` written by ``atexport executorch`` (XNNPACK delegate) on the CPU.

**Needs torch**: ExecuTorch's Python runtime (``executorch.runtime``) takes and returns torch tensors, so
this runner imports torch when activated (only then). An app on a phone runs the same ``.pte`` with
ExecuTorch's C++/Java/Swift runtime and no Python (docs/deploy.md); on a machine without torch use the
LiteRT or ONNX artifacts. Its atexport metadata comes from the sidecar ``model.pte.json``.

The program takes a batch of 1; :meth:`infer` runs larger batches one image at a time. Separable programs
(``atexport executorch --separable``) take the task's adapter and head tensors as method inputs after the
image (positions in the metadata's ``extra.executorch.weight_inputs``): ``add_task`` / ``use`` /
``infer(task=...)`` as for the other separable runners.
"""

from __future__ import annotations

import numpy as np

from atexport.errors import BadInputError, require
from atexport.runtime.edge import EdgeRunner
from atexport.utils.io import error_reason


def require_executorch():
    """Import ``executorch.runtime`` (and so torch) or raise :class:`~atexport.errors.MissingDependencyError`."""
    return require("executorch.runtime", "running ExecuTorch (.pte) programs (its Python runtime needs torch)",
                   "executorch")


class ExecuTorchRunner(EdgeRunner):
    """Runs an atexport ``.pte`` with ExecuTorch's Python runtime (imports torch when activated).

    Args:
        model: the ``.pte`` path (its ``.pte.json`` sidecar beside it), or the program's bytes with
            ``metadata`` given.
        metadata: the model's :class:`~atexport.artifact.metadata.ModelMetadata` (read from the sidecar
            when ``model`` is a path).
        name: label used in reports.
    """

    fmt = "executorch"

    def __init__(self, model, metadata=None, name: str = "executorch"):
        super().__init__(model, metadata=metadata, name=name)
        self.program = self.method = None

    def _load(self, record: dict) -> None:
        et = require_executorch()
        source = bytes(self.model) if isinstance(self.model, (bytes, bytearray)) else str(self.model)
        try:
            self.program = et.Runtime.get().load_program(source)
            self.method = self.program.load_method(record.get("method", "forward"))
        except (RuntimeError, ValueError) as e:
            raise BadInputError(f"{self.where}: ExecuTorch cannot load it ({error_reason(e, 300)}).") from None
        n = int(self.method.metadata.num_inputs())
        want = 1 + len(record.get("weight_inputs") or {}) + (record.get("task_input") is not None)
        if n != want:
            raise BadInputError(f"{self.where}: the program takes {n} inputs, its metadata describes {want}; "
                                "re-export it with 'atexport executorch'.")

    def _run_one(self, x: np.ndarray, weights: dict) -> np.ndarray:
        import torch

        inputs = [torch.from_numpy(np.require(x, requirements=["C", "W"]))]  # torch wants writable arrays
        inputs += [torch.from_numpy(np.require(weights[i], requirements=["C", "W"])) for i in sorted(weights)]
        try:
            out = self.method.execute(inputs)
        except (RuntimeError, ValueError) as e:
            raise BadInputError(f"{self.where}: ExecuTorch could not run an image of {tuple(x.shape[1:])} "
                                f"({error_reason(e, 300)}).") from None
        return out[0].detach().numpy()

    def _deactivate(self):
        self.program = self.method = None

    def describe(self) -> str:
        return f"executorch {self.precision or ''} (XNNPACK CPU)"


def open_executorch(path, options=None):
    """The loader of the ``executorch`` backend: an atexport ``.pte`` in ExecuTorch (an active runner)."""
    from atexport.runtime.edge import open_edge

    return open_edge(ExecuTorchRunner, path, options)
