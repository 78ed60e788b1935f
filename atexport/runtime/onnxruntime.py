"""ONNX Runtime runner (CPU by default; CUDA/TensorRT execution providers where installed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atexport.errors import BadInputError, MissingDependencyError, require
from atexport.runtime.base import Runner
from atexport.utils.io import error_reason


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
    providers = [providers] if isinstance(providers, str) else list(providers or ["CPUExecutionProvider"])
    wanted = check_providers(ort, providers)
    try:
        # no silent fallback to CPU (ORT prints an "EP Error" banner and carries on): a provider asked for
        # and not usable is an error, exit 4
        session = ort.InferenceSession(src, session_options(threads, optimization), providers=providers,
                                       enable_fallback=0)
    except Exception as e:
        msg = error_reason(e, 300)
        gpu = [n for n in wanted if n != "CPUExecutionProvider"]
        if gpu and any(k in str(e) for k in ("ExecutionProvider", "CUDA", "cuda", "TensorRT", "provider")):
            raise MissingDependencyError(
                f"--provider {gpu[0]}: ONNX Runtime cannot start it ({msg}); {_PROVIDER_PACKAGES.get(gpu[0], _OTHER)}"
            ) from None
        raise BadInputError(f"{where}: ONNX Runtime cannot load it ({msg}). Re-export it with 'atexport onnx'.") from None
    got = set(session.get_providers())
    lost = [n for n in wanted if n not in got]
    if lost:
        raise MissingDependencyError(
            f"--provider {lost[0]}: ONNX Runtime did not start it (it runs on {', '.join(session.get_providers())}); "
            f"{_PROVIDER_PACKAGES.get(lost[0], _OTHER)}"
        )
    return session


_OTHER = "it needs an ONNX Runtime build with that provider."
_PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "it needs the onnxruntime-gpu package (pip install onnxruntime-gpu, in place of "
                             "onnxruntime), a CUDA GPU and its driver.",
    "TensorrtExecutionProvider": "it needs the onnxruntime-gpu package (pip install onnxruntime-gpu, in place of "
                                 "onnxruntime), TensorRT and a CUDA GPU; or build an engine with 'atexport trt'.",
    "OpenVINOExecutionProvider": "it needs the onnxruntime-openvino package (pip install onnxruntime-openvino); "
                                 "or use 'atexport openvino'.",
    "DmlExecutionProvider": "it needs the onnxruntime-directml package on Windows (pip install onnxruntime-directml).",
    "CoreMLExecutionProvider": "it comes with the onnxruntime package on macOS.",
    "ROCMExecutionProvider": "it needs an ONNX Runtime build for ROCm (onnxruntime-rocm) and an AMD GPU.",
    "MIGraphXExecutionProvider": "it needs an ONNX Runtime build for ROCm with MIGraphX and an AMD GPU.",
    "QNNExecutionProvider": "it needs the onnxruntime-qnn package on a Qualcomm device.",
}


def check_providers(ort, providers) -> list[str]:
    """Provider names of ``providers`` (names or ``(name, options)``), all available in this ONNX Runtime.

    Raises:
        BadInputError: a name that is no ONNX Runtime execution provider at all.
        MissingDependencyError: a provider this ONNX Runtime build does not include (exit 4), with the
            package that brings it.
    """
    names = []
    if isinstance(providers, str):  # one name, not a sequence of one-letter names
        providers = [providers]
    for p in providers:
        name = p[0] if isinstance(p, (tuple, list)) and p else p
        if not isinstance(name, str):
            raise BadInputError(f"--provider {p!r}: expected a provider name such as CPUExecutionProvider.")
        names.append(name)
    available = list(ort.get_available_providers())
    for name in names:
        if name in available:
            continue
        if name not in ort.get_all_providers():
            raise BadInputError(
                f"--provider {name}: not an ONNX Runtime execution provider; this installation has "
                f"{', '.join(available)}."
            )
        raise MissingDependencyError(
            f"--provider {name}: not available in this ONNX Runtime ({ort.__version__}, which has "
            f"{', '.join(available)}); {_PROVIDER_PACKAGES.get(name, _OTHER)}"
        )
    return names


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
        session: an ``InferenceSession`` of ``model`` already open (its loader's), used on the first activation.
    """

    def __init__(self, model, threads=None, providers=None, feeds=None, name="onnxruntime", optimization="all",
                 input_name=None, output_name=None, session=None):
        super().__init__()
        self.model, self.threads, self.providers = model, threads, providers
        self.optimization = optimization
        self.feeds = dict(feeds or {})
        self.name = name
        self.session = None
        self._want_input, self._want_output = input_name, output_name
        self._given = session

    def _activate(self):
        # a session the loader already opened (to read the metadata) is used, not opened twice
        self.session, self._given = self._given or create_session(self.model, self.threads, self.providers,
                                                                  self.optimization), None
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


_ONNX_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool"}


def onnx_io(path):
    """``(metadata, inputs, outputs, None)`` of an atexport ONNX model as a server sees it: tensors as
    ``{name, dtype, shape}`` (dynamic dims by name or -1); overridable initializers are not request inputs."""
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.artifact.onnx import read_onnx

    proto = read_onnx(path, "--model")
    meta = read_onnx_metadata(proto, str(path))
    inits = {i.name for i in proto.graph.initializer}

    def tensors(values):
        out = []
        for vi in values:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.dim_value else (d.dim_param or -1) for d in tt.shape.dim]
            out.append({"name": vi.name, "dtype": _ONNX_TYPES.get(tt.elem_type, "float32"), "shape": shape})
        return out

    return meta, tensors(proto.graph.input), tensors(proto.graph.output), None
