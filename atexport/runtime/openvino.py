"""OpenVINO runner: ONNX models and OpenVINO IR on the CPU, with the inference precision explicit.

OpenVINO's CPU plugin picks its own inference precision unless told: on CPUs with AMX or AVX512-BF16
it runs FP32 models in BF16. A parity number that does not say which precision ran is worthless, so
:class:`OpenVINORunner` always sets ``INFERENCE_PRECISION_HINT`` and reports what the compiled model
ran in ``runner.precision``:

* ``fp32``: ``INFERENCE_PRECISION_HINT=f32`` (parity to float rounding with ONNX Runtime);
* ``bf16`` / ``fp16``: the hint ``bf16`` / ``f16``, refused on a CPU that lacks it (BF16 needs AMX or
  AVX512-BF16, FP16 needs AVX512-FP16 or AMX-FP16);
* ``int8``: what a Q/DQ model (``atexport ... --precision int8``) runs in: OpenVINO turns the Q/DQ pairs
  into FakeQuantize and runs those layers in INT8 (``runner.int8_layers`` counts them from the runtime
  graph); the float ops around them run in FP32 (the hint is ``f32``), so the only error is the one the
  Q/DQ file was verified with;
* ``int8+bf16``: the same INT8 layers, the float ops around them (LayerNorm, attention's
  activation-by-activation MatMuls, the layers kept float) in BF16: the fastest CPU path measured
  (bench/RESULTS.md, issue #13), with BF16's error on top of INT8's.

The default (``precision=None``) is the file's own precision: the one an IR written by ``atexport
openvino`` records (``extra.openvino.precision``), else ``fp32`` for FP32 and FP16 ONNX files and ``int8``
for Q/DQ files.

Separable models (``atexport onnx --separable``): OpenVINO cannot override an initializer at run time
(its ONNX reader turns every initializer into a Constant). The runner therefore replaces the Constants
named in the metadata manifest with Parameters before compiling (:func:`expose_weights`, the same on an
ONNX file and on an IR) and feeds the task's tensors with every request, as
:class:`~atexport.runtime.session.AdapterSession` does for ONNX Runtime: a swap is changing a dict, no
recompile. Multi-task models take their per-sample ``task_id`` input as ONNX Runtime does.

``openvino`` is imported only when a runner is activated; without it the error names the extra:
``pip install 'atexport[openvino]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError, require
from atexport.runtime.base import Runner
from atexport.runtime.session import TaskHolder
from atexport.utils.io import error_reason

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8+bf16")
QUANTIZED = ("int8", "int8+bf16")
# INFERENCE_PRECISION_HINT per precision: the float ops of an INT8 (Q/DQ) model run in FP32, or in BF16 (int8+bf16).
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32", "int8+bf16": "bf16"}
# What the CPU plugin must list in OPTIMIZATION_CAPABILITIES for a precision.
_CAPABILITY = {"bf16": ("BF16", "AMX or AVX512-BF16"), "int8+bf16": ("BF16", "AMX or AVX512-BF16"),
               "fp16": ("FP16", "AVX512-FP16 or AMX-FP16")}
_OV_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
_COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution")
IR_SUFFIX = ".xml"
META_RT_KEY = "atexport"


def require_openvino():
    """Import ``openvino`` or raise :class:`~atexport.errors.MissingDependencyError` naming the extra."""
    return require("openvino", "running models with OpenVINO", "openvino")


_CORE = None


def ov_core():
    """One shared ``openvino.Core`` (creating it loads the plugins: done once per process)."""
    global _CORE
    if _CORE is None:
        _CORE = require_openvino().Core()
    return _CORE


def cpu_capabilities(device: str = "CPU") -> list[str]:
    """What the OpenVINO device can run (``OPTIMIZATION_CAPABILITIES``: ``FP32``, ``BF16``, ``FP16``, ``INT8``...)."""
    return [str(c) for c in ov_core().get_property(device, "OPTIMIZATION_CAPABILITIES")]


def read_ov_model(source, flag: str = "--model"):
    """An ``openvino.Model`` from an ONNX file, an OpenVINO IR (``.xml`` with its ``.bin``), or ONNX bytes.

    Raises:
        BadInputError: missing file, missing ``.bin``, or a file OpenVINO cannot read.
    """
    core = ov_core()
    if isinstance(source, (bytes, bytearray)):
        where = "in-memory ONNX model"
        args = (bytes(source),)
    elif hasattr(source, "SerializeToString"):  # onnx.ModelProto
        where = "in-memory ONNX model"
        args = (source.SerializeToString(),)
    else:
        path = Path(source)
        where = f"{flag} {path}"
        if not path.is_file():
            raise BadInputError(f"{where}: no such file (give an .onnx model or an OpenVINO .xml IR).")
        if path.suffix.lower() == IR_SUFFIX and not path.with_suffix(".bin").is_file():
            raise BadInputError(f"{where}: its weights {path.with_suffix('.bin').name} are missing beside it.")
        if path.suffix.lower() not in (".onnx", IR_SUFFIX):
            raise BadInputError(f"{where}: unknown model type {path.suffix!r}; give an .onnx model or an OpenVINO .xml IR.")
        args = (str(path),)
    try:
        return core.read_model(*args)
    except (RuntimeError, ValueError, TypeError) as e:  # what openvino raises for a file it cannot read
        msg = error_reason(e, 300)
        raise BadInputError(f"{where}: OpenVINO cannot read it ({msg}).") from None


def _rt_string(rt, keys) -> str | None:
    try:
        node = rt
        for k in keys:
            node = node[k]
        value = node.astype(str) if hasattr(node, "astype") else node
        return str(value) if value else None
    except (KeyError, IndexError, RuntimeError, TypeError):
        return None


def read_metadata(ov_model, where: str = "model"):
    """The atexport metadata of an OpenVINO model (IR ``rt_info``, or the ONNX file's ``metadata_props``).

    Returns:
        A :class:`~atexport.artifact.metadata.ModelMetadata`, or ``None`` when the model carries none.
    """
    from atexport.artifact.metadata import META_KEY, ModelMetadata

    rt = ov_model.get_rt_info()
    text = None
    for keys in ((META_RT_KEY,), ("framework", META_KEY)):
        try:
            if ov_model.has_rt_info(list(keys)):
                text = _rt_string(rt, keys)
        except RuntimeError:
            text = None
        if text:
            break
    return ModelMetadata.from_json(text, where) if text else None


def port_shapes(ports) -> dict[str, list | None]:
    """``{name: shape}`` of OpenVINO model ports (``None`` for a dynamic axis or rank)."""
    out: dict[str, list | None] = {}
    for port in ports:
        try:
            name = port.get_any_name()
        except RuntimeError:  # a port without a name cannot be one the metadata names
            continue
        ps = port.get_partial_shape()
        out[name] = None if ps.rank.is_dynamic else [d.get_length() if d.is_static else None for d in ps]
    return out


def check_ov_graph(meta, ov_model, where: str) -> None:
    """The graph-vs-metadata check every backend makes (:mod:`atexport.artifact.graph`), on an OpenVINO model
    (an IR, or an ONNX file as OpenVINO reads it; exposed task weights are inputs)."""
    from atexport.artifact.graph import check_graph_fits_metadata

    check_graph_fits_metadata(meta, port_shapes(ov_model.inputs), port_shapes(ov_model.outputs), where)


def is_quantized(ov_model) -> bool:
    """Whether the model holds Q/DQ (FakeQuantize once read by OpenVINO) layers."""
    return any(op.get_type_name() in ("FakeQuantize", "QuantizeLinear") for op in ov_model.get_ops())


def resolve_precision(requested: str | None, quantized: bool, where: str, device: str = "CPU") -> str:
    """The precision to run: the file's own by default; refuse what the file or the CPU cannot do.

    Raises:
        BadInputError: unknown precision, ``int8`` for a float file, ``bf16``/``fp16`` for an INT8 file.
        MissingDependencyError: the CPU lacks BF16 or FP16 support.
    """
    from atexport.errors import MissingDependencyError

    if requested is None:
        return "int8" if quantized else "fp32"
    p = str(requested).lower()
    if p not in PRECISIONS:
        raise BadInputError(f"--precision {requested}: expected one of {', '.join(PRECISIONS)}.")
    if p in QUANTIZED and not quantized:
        raise BadInputError(
            f"--precision {p}: {where} has no Q/DQ layers, so it cannot run in INT8; quantize it first: "
            "'atexport trt --onnx MODEL.onnx --precision int8 --calib IMAGES --build no' writes MODEL.int8.onnx "
            "(verified against FP32); give that file."
        )
    if quantized and p not in QUANTIZED:
        raise BadInputError(
            f"--precision {p}: {where} is an INT8 (Q/DQ) model; it runs as int8 (float ops in FP32, the precision "
            "it was verified with) or int8+bf16 (float ops in BF16). For plain BF16 or FP16 give the FP32 model."
        )
    if p in _CAPABILITY:
        cap, needs = _CAPABILITY[p]
        have = cpu_capabilities(device)
        if cap not in have:
            raise MissingDependencyError(
                f"--precision {p}: this {device} cannot run {p.upper()} (it needs {needs}; OpenVINO reports {have}). "
                "Use --precision fp32, or an INT8 model."
            )
    return p


def weight_constants(ov_model, names) -> dict[str, Any]:
    """The Constant nodes named ``names`` (initializer names of a separable model's manifest)."""
    wanted = set(names)
    return {op.get_friendly_name(): op for op in ov_model.get_ops()
            if op.get_type_name() == "Constant" and op.get_friendly_name() in wanted}


def expose_weights(ov_model, names, where: str = "the model") -> dict[str, np.ndarray]:
    """Turn the named weight Constants into Parameters (model inputs); return their values in the file.

    OpenVINO folds ONNX initializers into Constants; a separable model's swappable tensors must be fed
    at run time instead, so each becomes a Parameter of the same name, shape and type.

    Raises:
        IncompatibleCheckpointError: a named tensor is not in the model (not a separable atexport model).
    """
    ov = require_openvino()
    consts = weight_constants(ov_model, names)
    missing = [n for n in names if n not in consts]
    if missing:
        raise IncompatibleCheckpointError(
            f"{where}: its manifest names swappable tensors the OpenVINO model does not hold as weights "
            f"({missing[:3]}); re-export it with 'atexport onnx --separable'."
        )
    values, params = {}, []
    for name in names:
        const = consts[name]
        values[name] = np.array(const.get_data(), copy=True)
        param = ov.opset13.parameter(const.get_output_shape(0), const.get_output_element_type(0), name=name)
        param.output(0).get_tensor().set_names({name})
        const.output(0).replace(param.output(0))
        params.append(param)
    ov_model.add_parameters(params)
    ov_model.validate_nodes_and_infer_types()
    return values


class OpenVINORunner(TaskHolder, Runner):
    """Runs an ONNX model or OpenVINO IR with OpenVINO, at an explicit precision.

    Args:
        model: ``.onnx`` or ``.xml`` path, ONNX bytes, or an ``onnx.ModelProto``.
        precision: ``fp32``, ``bf16``, ``fp16``, ``int8`` or ``int8+bf16`` (see the module docstring);
            ``None``: the file's.
        threads: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores).
        device: OpenVINO device (``CPU``).
        cache_dir: compiled-model cache folder (``CACHE_DIR``): a second load of the same model skips compiling.
        name: label used in reports.
        swappable: separable models: feed the manifest's tensors as inputs, so tasks can be swapped
            (default); ``False`` keeps the file's weights as constants (one task, fixed).
        performance_hint: ``LATENCY`` (default: one stream using every thread, what a synchronous app
            sees) or ``THROUGHPUT``.
        where: how messages name the model (default: its path).

    The image input and logits output are the metadata's (else the first input and output); extra inputs
    (``task_id``) are given per call, ``infer(batch, task_id=ids)``.

    Attributes (once active):
        precision: what ran (``fp32``, ``bf16``, ``fp16``, ``int8``, ``int8+bf16``).
        inference_precision: the compiled model's ``INFERENCE_PRECISION_HINT`` (``fp32``/``bf16``/``fp16``).
        int8_layers: ``(INT8 compute layers, all compute layers)`` of the runtime graph.
        metadata: the atexport metadata, if the model carries it.
        compile_seconds: time spent compiling.
    """

    def __init__(self, model, precision: str | None = None, threads: int | None = None, device: str = "CPU",
                 cache_dir: str | os.PathLike | None = None, name: str = "openvino", swappable: bool = True,
                 performance_hint: str = "LATENCY", where: str | None = None):
        super().__init__()
        if precision is not None and str(precision).lower() not in PRECISIONS:
            raise BadInputError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}.")
        if str(performance_hint).upper() not in ("LATENCY", "THROUGHPUT"):
            raise BadInputError(f"performance_hint {performance_hint!r}: expected LATENCY or THROUGHPUT.")
        if threads is not None and int(threads) < 1:
            raise BadInputError(f"--threads {threads}: must be at least 1.")
        self.model, self.requested, self.threads, self.device = model, precision, threads, device
        self.cache_dir = cache_dir
        self.name = name
        self._swappable = swappable
        self.performance_hint = str(performance_hint).upper()
        # what messages name: the file the user gave (``where``), not a temporary IR made from it
        self.where = where or (str(model) if isinstance(model, (str, os.PathLike)) else "in-memory model")
        self.precision: str | None = None
        self.inference_precision: str | None = None
        self.int8_layers: tuple[int, int] = (0, 0)
        self.metadata = None
        self.compile_seconds = 0.0
        self.compiled = self.request = None
        self._tasks: dict[str | None, dict[str, np.ndarray]] = {None: {}}
        self.task: str | None = None

    # ------------------------------------------------------------------ activation

    def config(self) -> dict:
        """The properties the model is compiled with."""
        cfg = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision or "fp32"], "PERFORMANCE_HINT": self.performance_hint}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.cache_dir:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            cfg["CACHE_DIR"] = str(self.cache_dir)
        return cfg

    def _activate(self):
        import time

        ov_model = read_ov_model(self.model)
        self.metadata = read_metadata(ov_model, self.where)
        quantized = is_quantized(ov_model)
        requested = self.requested
        if requested is None and self.metadata is not None:  # an IR written by 'atexport openvino' says its own
            requested = ((self.metadata.extra or {}).get("openvino") or {}).get("precision")
        self.precision = resolve_precision(requested, quantized, self.where, self.device)
        names = self._swappable_names()
        self._tasks = {None: expose_weights(ov_model, names, self.where) if names else {}}
        self.task = None
        if self.metadata is not None:
            check_ov_graph(self.metadata, ov_model, self.where)
        inputs = [i.get_any_name() for i in ov_model.inputs if i.get_any_name() not in self._tasks[None]]
        outputs = [o.get_any_name() for o in ov_model.outputs]
        meta_in = (self.metadata.input or {}).get("name") if self.metadata else None
        meta_out = (self.metadata.output or {}).get("name") if self.metadata else None
        self.input_name = meta_in if meta_in in inputs else inputs[0]
        self.output_name = meta_out if meta_out in outputs else outputs[0]
        self.input_names = inputs
        t0 = time.perf_counter()
        try:
            self.compiled = ov_core().compile_model(ov_model, self.device, self.config())
        except (RuntimeError, ValueError, TypeError) as e:
            msg = error_reason(e, 300)
            raise BadInputError(f"{self.where}: OpenVINO cannot compile it for {self.device} ({msg}).") from None
        self.compile_seconds = time.perf_counter() - t0
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.inference_precision = _OV_NAMES.get(hint, hint)
        self.int8_layers = self._count_int8()

    def _swappable_names(self) -> list[str]:
        meta = self.metadata
        if not self._swappable:
            return []
        if meta is None or not meta.separable or not meta.manifest or meta.tasks:
            return []
        return [e.get("initializer", k) for k, e in meta.manifest.items()]

    def _count_int8(self) -> tuple[int, int]:
        total = low = 0
        for op in self.compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            if _rt_string(rt, ("layerType",)) in _COMPUTE_LAYERS:
                total += 1
                if _rt_string(rt, ("runtimePrecision",)) in ("i8", "u8"):
                    low += 1
        return low, total

    def _deactivate(self):
        self.request = self.compiled = None

    def describe(self) -> str:
        """One line: what ran (precision, INT8 layers, threads)."""
        if not self.is_active:
            return f"openvino ({self.requested or 'file precision'}, not active)"
        s = f"openvino {self.device} {self.precision} (inference precision {self.inference_precision}"
        if self.precision in QUANTIZED:
            s += f", {self.int8_layers[0]} of {self.int8_layers[1]} compute layers in INT8"
        return s + f", threads {self.threads or 'all'})"

    # ------------------------------------------------------------------ separable tasks

    @property
    def separable(self) -> bool:
        return bool(self._tasks.get(None))

    def _check_swappable(self) -> None:
        if not self.is_active:
            self.activate()
        if not self._tasks[None]:
            raise IncompatibleCheckpointError(
                f"{self.where} holds one task with its adapter and head weights fused into the graph; "
                "re-export it with 'atexport onnx --separable' to swap tasks."
            )

    # ------------------------------------------------------------------ inference

    def run(self, batch: np.ndarray, output_names=None, task: Any = "__current__", **feeds) -> dict[str, np.ndarray]:
        """Run one batch and return the named outputs (all by default) as numpy arrays."""
        if not self.is_active:
            self.activate()
        self._request(np.ascontiguousarray(batch, dtype=np.float32), task, feeds)
        names = list(output_names) if output_names else [o.get_any_name() for o in self.compiled.outputs]
        return {n: np.array(self.request.get_tensor(n).data, copy=True) for n in names}

    def _request(self, batch, task, feeds):
        feed = {self.input_name: batch, **self._task_feeds(task), **feeds}
        unknown = [k for k in feed if k not in self.input_names and k not in self._tasks[None]]
        if unknown:
            raise BadInputError(f"{self.where}: no input named {unknown[0]!r}; its inputs are {self.input_names}.")
        try:
            self.request.infer(feed)
        except (RuntimeError, ValueError, TypeError) as e:
            msg = error_reason(e, 300)
            raise BadInputError(f"{self.where}: OpenVINO could not run this batch of {tuple(batch.shape)} ({msg}).") from None

    def _infer(self, batch, task: Any = "__current__", **feeds):
        self._request(batch, task, feeds)
        return np.array(self.request.get_tensor(self.output_name).data, dtype=np.float32, copy=True)


def open_openvino(path, options=None):
    """The loader of the ``openvino`` backend: an atexport ONNX model or OpenVINO IR, at ``options.precision``
    (default: the file's own).

    The runner of a separable model feeds task weights by name (``add_task`` / ``use`` / ``infer(task=...)`` as
    ``AdapterSession``), a multi-task one takes ``task_id``.

    Returns:
        An :class:`~atexport.runtime.backends.Opened` with an active runner (labelled with what it compiled).

    Raises:
        BadInputError: missing or unreadable file, no atexport metadata, metadata that does not match the graph.
    """
    from atexport.artifact.bank import TASK_INPUT
    from atexport.runtime.backends import LoadOptions, Opened

    o = options or LoadOptions()
    flag = o.flag
    runner = OpenVINORunner(str(path), precision=o.precision, threads=o.threads, name="openvino")
    runner.activate()
    meta = runner.metadata
    if meta is None:
        raise BadInputError(f"{flag} {path}: no atexport metadata (preprocessing, classes); export it with 'atexport onnx'.")
    if meta.tasks and TASK_INPUT not in runner.input_names:
        raise BadInputError(f"{flag} {path}: its metadata lists tasks but the model has no {TASK_INPUT!r} input "
                            f"({runner.input_names}).")
    b = meta.input.get("shape", [None])[0]
    return Opened(meta, runner, meta.mode, b if isinstance(b, int) else None, runner.precision)


def openvino_io(path):
    """``(metadata, inputs, outputs, None)`` of an OpenVINO IR written by ``atexport openvino`` as a server sees
    it: tensors as ``{name, dtype, shape}`` (dynamic dims: -1)."""
    model = read_ov_model(path, "--model")
    meta = read_metadata(model, f"--model {path}")
    if meta is None:
        raise BadInputError(f"--model {path}: no atexport metadata; write the IR with "
                            "'atexport openvino --onnx MODEL.onnx'.")
    types = {"f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32", "u8": "uint8", "i8": "int8",
             "boolean": "bool"}

    def tensors(ports):
        return [{"name": p.get_any_name(), "dtype": types.get(p.get_element_type().get_type_name(), "float32"),
                 "shape": [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()]} for p in ports]

    return meta, tensors(model.inputs), tensors(model.outputs), None


def ir_precision(meta) -> str:
    """The precision an IR written by ``atexport openvino`` records (``fp32`` where it records none)."""
    return str(((meta.extra or {}).get("openvino") or {}).get("precision") or "fp32")


BF16_NOTE = ("Triton's OpenVINO backend takes no FP32 precision hint: on a host with AMX or AVX512-BF16, "
             "OpenVINO runs this FP32 IR in BF16 (check that precision with 'atexport verify --openvino "
             "MODEL.onnx --openvino-precision bf16'); serve it with onnxruntime_onnx where FP32 is required.")


def triton_parameters(meta) -> tuple[dict, list[str]]:
    """The ``parameters`` Triton's OpenVINO backend runs an IR with, and what the user should know.

    ``PERFORMANCE_HINT: LATENCY``; ``HINT_BF16: YES`` for a BF16 or INT8+BF16 IR. The backend has no FP32 hint:
    on AMX / AVX512-BF16 hosts OpenVINO then runs an FP32 IR (or an INT8 IR's float ops) in BF16, which a note says.
    """
    precision = ir_precision(meta)
    params, notes = {"PERFORMANCE_HINT": "LATENCY"}, []
    if precision in ("bf16", "int8+bf16"):
        params["HINT_BF16"] = "YES"
    elif precision == "fp32":
        notes.append(BF16_NOTE)
    else:  # int8: its INT8 layers run in INT8 either way; its float ops may run in BF16
        notes.append(BF16_NOTE.replace("this FP32 IR", "the float ops of this INT8 IR").replace(
            "--openvino-precision bf16", "--openvino-precision int8+bf16").replace("MODEL.onnx", "MODEL.int8.onnx"))
    return params, notes
