"""ONNX Runtime runner (CPU by default; CUDA/TensorRT execution providers where installed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atexport.errors import BadInputError, require
from atexport.runtime.base import Runner


def session_options(threads: int | None = None, optimization: str = "all"):
    ort = require("onnxruntime", "running ONNX models", "runtime")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def create_session(model, threads: int | None = None, providers=None, optimization: str = "all"):
    """An ``InferenceSession`` from a path, bytes or ``onnx.ModelProto``, with clear errors."""
    ort = require("onnxruntime", "running ONNX models", "runtime")
    where = str(model) if isinstance(model, (str, os.PathLike)) else "in-memory model"
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise BadInputError(f"{model}: no such ONNX file.")
        src = str(model)
    elif isinstance(model, bytes):
        src = model
    else:
        src = model.SerializeToString()
    providers = providers or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(src, session_options(threads, optimization), providers=providers)
    except Exception as e:
        msg = str(e).splitlines()[0][:300]
        raise BadInputError(f"{where}: ONNX Runtime cannot load it ({msg}). Re-export it with 'atexport onnx'.") from None


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model with ONNX Runtime.

    Args:
        model: path, bytes or ``onnx.ModelProto``.
        threads: intra-op threads (None: ONNX Runtime's default, all cores).
        providers: execution providers, CPU by default.
        feeds: constant extra inputs given with every batch (e.g. swapped adapter weights).
        name: label used in reports.
        optimization: graph optimisation level (``disable``, ``basic``, ``extended``, ``all``).
        input_name: the image input (default: the session's first input; multi-task models also take
            ``task_id``, fed by name).
        output_name: the logits output (default: the session's first output).
    """

    def __init__(self, model, threads=None, providers=None, feeds=None, name="onnxruntime", optimization="all",
                 input_name=None, output_name=None):
        super().__init__()
        self.model, self.threads, self.providers = model, threads, providers
        self.optimization = optimization
        self.feeds = dict(feeds or {})
        self.name = name
        self.session = None
        self._want_input, self._want_output = input_name, output_name

    def _activate(self):
        self.session = create_session(self.model, self.threads, self.providers, self.optimization)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        for want, have, what in ((self._want_input, inputs, "input"), (self._want_output, outputs, "output")):
            if want is not None and want not in have:
                raise BadInputError(f"the ONNX model has no {what} named {want!r}; its {what}s are {have}.")
        self.input_name = self._want_input or inputs[0]
        self.output_name = self._want_output or outputs[0]

    def _deactivate(self):
        self.session = None

    def run(self, batch: np.ndarray, output_names=None, **feeds) -> dict[str, np.ndarray]:
        """Run one batch and return the named outputs (all outputs by default) as numpy arrays."""
        if not self.is_active:
            self.activate()
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32), **self.feeds, **feeds}
        names = list(output_names) if output_names else [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def _infer(self, batch, **feeds):
        feed = {self.input_name: batch, **self.feeds, **feeds}
        return np.asarray(self.session.run([self.output_name], feed)[0], dtype=np.float32)
