"""LiteRT runner: a ``.tflite`` written by ``atexport litert`` on the CPU (XNNPACK), without torch.

The model runs in ``ai_edge_litert``'s interpreter (the ``[litert]`` extra's runtime; no torch, no
TensorFlow), through its ``serving_default`` signature. Its atexport metadata comes from the sidecar
``model.tflite.json`` (:mod:`atexport.artifact.edge`). The artifact takes a batch of 1; :meth:`infer`
runs larger batches one image at a time (:class:`~atexport.runtime.edge.EdgeRunner`).

Separable models (``atexport litert --separable``) take the task's adapter and head tensors as signature
inputs after the image (the metadata's ``extra.litert.weight_inputs`` maps each tensor to its input), so
a task swap is changing the arrays fed (``add_task`` / ``use`` / ``infer(task=...)``), nothing is rebuilt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from atexport.errors import BadInputError, require
from atexport.runtime.edge import EdgeRunner
from atexport.utils.io import error_reason

SIGNATURE = "serving_default"


def require_litert():
    """Import ``ai_edge_litert.interpreter`` or raise :class:`~atexport.errors.MissingDependencyError`."""
    return require("ai_edge_litert.interpreter", "running LiteRT (.tflite) models", "litert")


class LiteRTRunner(EdgeRunner):
    """Runs an atexport ``.tflite`` with the LiteRT interpreter.

    Args:
        model: the ``.tflite`` path (its ``.tflite.json`` sidecar beside it), or the model's bytes with
            ``metadata`` given.
        threads: interpreter threads (``None``: LiteRT's default).
        metadata: the model's :class:`~atexport.artifact.metadata.ModelMetadata` (read from the sidecar
            when ``model`` is a path).
        name: label used in reports.
    """

    fmt = "litert"

    def __init__(self, model, threads: int | None = None, metadata=None, name: str = "litert"):
        super().__init__(model, metadata=metadata, name=name)
        if threads is not None and int(threads) < 1:
            raise BadInputError(f"--threads {threads}: must be at least 1.")
        self.threads = threads
        self.interpreter = self.signature = None

    def _load(self, record: dict) -> None:
        lite = require_litert()
        kwargs: dict[str, Any] = {"num_threads": int(self.threads)} if self.threads else {}
        try:
            if isinstance(self.model, (bytes, bytearray)):
                self.interpreter = lite.Interpreter(model_content=bytes(self.model), **kwargs)
            else:
                self.interpreter = lite.Interpreter(model_path=str(self.model), **kwargs)
            self.signature = self.interpreter.get_signature_runner(record.get("signature", SIGNATURE))
        except (RuntimeError, ValueError) as e:
            raise BadInputError(f"{self.where}: LiteRT cannot load it ({error_reason(e, 300)}).") from None
        details = self.signature.get_input_details()
        self.input_names = list(details)
        self._dtypes = {k: d["dtype"] for k, d in details.items()}  # e.g. task_id: the converter makes it int32
        outputs = list(self.signature.get_output_details())
        self.input_name = record.get("image_input", self.input_names[0])
        self.output_name = record.get("logits_output", outputs[0])
        missing = [i for i in [self.input_name, *(record.get("weight_inputs") or {}).values()]
                   if i not in self.input_names]
        if missing or self.output_name not in outputs:
            raise BadInputError(f"{self.where}: its metadata names inputs or outputs the model lacks "
                                f"({missing[:3] or self.output_name}); re-export it with 'atexport litert'.")

    def _run_one(self, x: np.ndarray, weights: dict) -> np.ndarray:
        try:
            feed = {k: np.asarray(v, dtype=self._dtypes.get(k, np.float32)) for k, v in weights.items()}
            return self.signature(**{self.input_name: x, **feed})[self.output_name]
        except (RuntimeError, ValueError) as e:
            raise BadInputError(f"{self.where}: LiteRT could not run an image of {tuple(x.shape[1:])} "
                                f"({error_reason(e, 300)}).") from None

    def _deactivate(self):
        self.interpreter = self.signature = None

    def describe(self) -> str:
        return f"litert {self.precision or ''} (CPU, threads {self.threads or 'default'})"


def open_litert(path, options=None):
    """The loader of the ``litert`` backend: an atexport ``.tflite`` in LiteRT (an active runner)."""
    from atexport.runtime.edge import open_edge

    return open_edge(LiteRTRunner, path, options, threads=options.threads if options else None)
