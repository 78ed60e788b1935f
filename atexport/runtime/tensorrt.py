"""TensorRT runner: runs an atexport engine behind the common :class:`~atexport.runtime.base.Runner` interface.

Activation checks the engine's sidecar against this machine (TensorRT version, GPU compute capability;
a mismatch stops with the command that rebuilds it here), deserializes the engine, and creates an
execution context, a CUDA stream and GPU buffers. GPU memory and copies go through
:mod:`atexport.runtime.cuda` (cuda-python, or the CUDA runtime library through ctypes), so this runner
never imports torch; tensorrt is imported on activation only.

:meth:`TensorRTRunner.infer` uses TensorRT's name-based I/O API, the same on 10.x and 11.x:
``engine.num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``,
``context.set_input_shape``, ``context.get_tensor_shape``, ``context.set_tensor_address`` and
``context.execute_async_v3(stream)``. Multi-task engines take the per-sample task index as a named feed,
``runner.infer(batch, task_id=ids)`` (int64, which TensorRT 10 and later accept as engine I/O).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atexport.artifact.sidecar import check_engine_compatible, read_sidecar, rebuild_command
from atexport.errors import AtexportError, BadInputError, IncompatibleCheckpointError, MissingDependencyError
from atexport.runtime.base import Runner

# TensorRT DataType member name -> numpy dtype (the types an atexport engine's I/O can have).
def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(
            "TensorRT's Python package is not installed; it is needed to build and run TensorRT engines. "
            "Install it on the GPU machine with: pip install 'atexport[tensorrt]' (on Jetson it comes with "
            "JetPack). The precision ONNX model can be built into an engine there."
        ) from None
    return trt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or ``None`` (without importing TensorRT's libraries)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        return str(import_tensorrt().__version__)
    except Exception:
        return None


def cuda_device(index: int = 0) -> dict:
    """``{"name", "compute_capability": [major, minor], "index"}`` of a CUDA GPU.

    Asks the CUDA runtime through :mod:`atexport.runtime.cuda` (cuda-python or ``libcudart``), never torch,
    so loading an engine in an app does not import it.

    Raises:
        MissingDependencyError: no CUDA runtime, or no usable CUDA GPU.
    """
    from atexport.runtime.cuda import NoCudaDevice, cuda_runtime

    try:
        return cuda_runtime().device_info(index)
    except NoCudaDevice as e:
        raise MissingDependencyError(
            f"{e} Build the engine on the target GPU (or Jetson) from the precision ONNX model with "
            "'atexport trt --onnx MODEL.onnx'."
        ) from None


def require_tensorrt(device: int = 0) -> tuple[Any, dict]:
    """TensorRT module and GPU ``device``, or one clear :class:`MissingDependencyError`."""
    trt = import_tensorrt()
    return trt, cuda_device(device)


def version_pin_hint(built: str, here: str) -> str:
    """What to install to run an engine built with TensorRT ``built`` where ``here`` is installed ('' if equal).

    ``pip install tensorrt`` (and ``tensorrt>=10.0``) resolves to the newest release, 11.x today, whose runtime
    does not load 10.x engines unless they were built version compatible; the pin names the build's release.
    """
    from atexport.artifact.sidecar import parse_version

    b, h = parse_version(built), parse_version(here)
    if b == h:
        return ""
    return (f"this engine was built with TensorRT {built} and this machine has {here}; to run it as built, install "
            f"the same release (pip install 'tensorrt-cu12=={built}', or the JetPack/Triton container that ships "
            f"it), or rebuild it here")


class _Logger:
    """A TensorRT logger that keeps errors for the exception message."""

    def __new__(cls, trt, verbose: bool = False):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(str(msg))
                if verbose or severity <= trt.ILogger.Severity.WARNING:
                    print(f"[TensorRT] {msg}")

        return Logger()


def load_engine(engine_path: str | os.PathLike, *, device: int = 0, log=None):
    """Check the sidecar against GPU ``device`` of this machine, then deserialize the engine.

    Returns:
        ``(trt, runtime, engine, sidecar)``.

    Raises:
        IncompatibleCheckpointError: built for another GPU or TensorRT version (says which, and the command
            that rebuilds it here).
    """
    say = log or (lambda *_: None)
    sidecar = read_sidecar(engine_path)
    trt, info = require_tensorrt(device)
    sidecar["engine"] = {**sidecar.get("engine", {}), "path": str(engine_path)}  # the rebuild command's -o
    built = str((sidecar.get("tensorrt") or {}).get("version", "?"))
    try:
        warnings = check_engine_compatible(sidecar, str(trt.__version__), info, where=f"engine {engine_path}")
    except IncompatibleCheckpointError as e:
        hint = version_pin_hint(built, str(trt.__version__))
        raise IncompatibleCheckpointError(f"{e}{' (' + hint + ')' if hint and hint not in str(e) else ''}") from None
    for w in warnings:
        say(f"warning: {w}")
    logger = _Logger(trt)
    runtime = trt.Runtime(logger)
    if sidecar.get("build", {}).get("engine_host_code_allowed"):
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise IncompatibleCheckpointError(
            f"TensorRT {trt.__version__} could not load engine {engine_path}, built with TensorRT {built} "
            f"({'; '.join(logger.errors[-2:]) or 'deserialization failed'}); rebuild it on this device: "
            f"{rebuild_command(sidecar)}"
        )
    return trt, runtime, engine, sidecar



TRT_TO_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


def numpy_dtype(trt_dtype) -> np.dtype:
    """The numpy dtype of a ``tensorrt.DataType`` (by member name, so no TensorRT import is needed).

    Raises:
        BadInputError: a type numpy has no equivalent of (BF16, FP8, INT4, FP4).
    """
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in TRT_TO_NUMPY:
        raise BadInputError(
            f"the engine has an input or output of TensorRT type {name}, which numpy cannot hold; rebuild it with "
            "'atexport trt' from an atexport ONNX model (float32 image and logits, int64 task_id)."
        )
    return np.dtype(TRT_TO_NUMPY[name])


def image_input(inputs: Mapping[str, np.dtype], name: str | None = None, where: str = "the engine") -> str:
    """The image input among an engine's inputs: ``name`` (from the metadata) if present, else the only float one."""
    if name in inputs:
        return str(name)
    floats = [n for n, dt in inputs.items() if np.issubdtype(dt, np.floating)]
    if len(floats) != 1:
        raise BadInputError(f"{where}: cannot tell its image input among {sorted(inputs)} (the metadata says {name!r}).")
    return floats[0]


def host_inputs(inputs: Mapping[str, np.dtype], image: str, batch: np.ndarray, feeds: Mapping,
                where: str = "the engine") -> dict[str, np.ndarray]:
    """The host arrays to copy into an engine's inputs, each C-contiguous, in the engine's dtype.

    ``batch`` goes to the ``image`` input; every other input (a multi-task engine's ``task_id``) comes from
    ``feeds`` by name, one value per sample.

    Raises:
        BadInputError: an unknown or missing input, a batch mismatch, floats for an integer input, or
            integers outside the range of the engine's integer type.
    """
    unknown = sorted(set(feeds) - set(inputs))
    if image in feeds:
        raise BadInputError(f"{where}: give the image batch as the first argument, not as {image}=.")
    if unknown:
        raise BadInputError(f"{where} has no inputs {unknown}; its inputs are {sorted(inputs)}.")
    missing = sorted(set(inputs) - set(feeds) - {image})
    if missing:
        hint = " (one int64 task index per sample, e.g. task_id=np.zeros(len(batch), np.int64))" if "task_id" in missing else ""
        raise BadInputError(f"{where} also takes the inputs {missing}; pass them by name{hint}.")
    batch = np.asarray(batch)
    out = {image: np.ascontiguousarray(batch, dtype=inputs[image])}
    n = len(batch)
    for name, value in feeds.items():
        want = inputs[name]
        a = np.asarray(value)
        if a.ndim == 0:
            a = np.full((n,), a.item(), dtype=a.dtype)
        if a.shape[:1] != (n,):
            raise BadInputError(f"{where}: {name} has shape {list(a.shape)}; it needs one value per sample ({n}).")
        if np.issubdtype(want, np.integer):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise BadInputError(f"{where}: {name} must hold integers (got {a.dtype}).")
            info = np.iinfo(want)
            if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
                raise BadInputError(f"{where}: {name} holds values outside {want}'s range.")
        out[name] = np.ascontiguousarray(a, dtype=want)
    return out


class TensorRTRunner(Runner):
    """``with TensorRTRunner("model.engine") as r: logits = r.infer(batch)``.

    Args:
        engine: path of an engine written by ``atexport trt`` (its ``.json`` sidecar beside it).
        device: CUDA device index.
        name: label used in reports.
        log: optional callable receiving warnings (e.g. built on another GPU model of the same architecture).
    """

    def __init__(self, engine, device: int = 0, name: str = "tensorrt", log=None):
        super().__init__()
        self.engine_path, self.device, self.name, self.log = engine, int(device), name, log
        self.engine = self.context = self.runtime = self.sidecar = self.cuda = None
        self.inputs: dict[str, np.dtype] = {}
        self.outputs: dict[str, np.dtype] = {}
        self.stream = 0
        self._buffers: dict = {}

    def _activate(self):
        from atexport.runtime.cuda import DeviceBuffer, cuda_runtime

        import_tensorrt()  # without TensorRT: its one sentence, before anything touches CUDA
        self.cuda = cuda_runtime()
        self.cuda.set_device(self.device)  # the engine is deserialized onto the current device
        self.trt, self.runtime, self.engine, self.sidecar = load_engine(self.engine_path, device=self.device,
                                                                        log=self.log)
        where = f"engine {self.engine_path}"
        eng = self.engine
        self.context = eng.create_execution_context()
        if self.context is None:
            raise AtexportError(f"{where}: TensorRT could not create an execution context (out of GPU memory?).")
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        is_input = {n: eng.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT for n in names}
        self.inputs = {n: numpy_dtype(eng.get_tensor_dtype(n)) for n in names if is_input[n]}
        self.outputs = {n: numpy_dtype(eng.get_tensor_dtype(n)) for n in names if not is_input[n]}
        if not self.outputs:
            raise BadInputError(f"{where} has no outputs.")
        md = self.sidecar.get("metadata") or {}
        self.image = image_input(self.inputs, (md.get("input") or {}).get("name"), where)
        out_name = (md.get("output") or {}).get("name")
        self.output = out_name if out_name in self.outputs else next(iter(self.outputs))
        self.stream = self.cuda.stream_create()
        self._buffers = {n: DeviceBuffer(self.cuda) for n in names}

    def _deactivate(self):
        try:
            if self.cuda is not None and self.stream:
                self.cuda.stream_synchronize(self.stream)
        finally:
            self.context = self.engine = self.runtime = None  # TensorRT objects first, then their memory
            for buf in self._buffers.values():
                buf.free()
            self._buffers = {}
            if self.cuda is not None and self.stream:
                self.cuda.stream_destroy(self.stream)
            self.stream = 0

    def _profile_hint(self, name: str) -> str:
        for p in (self.sidecar or {}).get("profiles") or []:
            if p.get("input") == name:
                return f"min {p.get('min')}, max {p.get('max')}"
        return "see the engine's sidecar"

    def _infer(self, batch, **feeds):
        where = f"engine {self.engine_path}"
        host = host_inputs(self.inputs, self.image, batch, feeds, where)
        ctx, cuda = self.context, self.cuda
        for name, a in host.items():
            if not ctx.set_input_shape(name, tuple(int(d) for d in a.shape)):
                raise BadInputError(
                    f"{where}: {name} of shape {list(a.shape)} is outside the engine's profile "
                    f"({self._profile_hint(name)}); rebuild with a wider --batch range."
                )
        outs = {}
        for name, dt in self.outputs.items():
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise AtexportError(f"{where}: TensorRT could not infer the shape of output {name} ({list(shape)}).")
            outs[name] = np.empty(shape, dtype=dt)
        for name, a in {**host, **outs}.items():
            ptr = self._buffers[name].ensure(a.nbytes)
            if not ctx.set_tensor_address(name, ptr):
                raise AtexportError(
                    f"{where}: TensorRT refused the GPU address of {name} (set_tensor_address returned False: a "
                    "misaligned or null pointer, or a name the engine does not have); see the TensorRT messages above."
                )
        for name, a in host.items():
            cuda.copy_to_device(self._buffers[name].ptr, a, self.stream)
        if not ctx.execute_async_v3(self.stream):
            raise AtexportError(f"{where}: TensorRT execution failed (see the TensorRT messages above).")
        for name, a in outs.items():
            cuda.copy_to_host(a, self._buffers[name].ptr, self.stream)
        cuda.stream_synchronize(self.stream)  # the host arrays stay referenced until here
        return np.asarray(outs[self.output], dtype=np.float32)


def open_tensorrt(path, options=None):
    """The loader of the ``tensorrt`` backend: an atexport engine and its sidecar.

    For an app (``options.app``) the runner is activated now: the sidecar is checked against this GPU and
    TensorRT version, with a clear error without TensorRT; for artifact reading the engine is loaded when its
    runner is activated. ``Opened.batch`` is the largest batch of the engine's optimisation profile.
    """
    from atexport.artifact.bank import TASK_INPUT
    from atexport.artifact.sidecar import profile_max_batch, sidecar_metadata
    from atexport.runtime.backends import LoadOptions, Opened

    o = options or LoadOptions()
    sidecar = read_sidecar(path, o.flag)
    meta = sidecar_metadata(sidecar, str(path) if o.app else f"{o.flag} {path}")
    runner = TensorRTRunner(str(path), device=o.device, name="tensorrt")
    if o.app:
        runner.activate()
        if meta.tasks and TASK_INPUT not in runner.inputs:
            raise BadInputError(f"{path}: its metadata lists tasks but the engine has no {TASK_INPUT!r} input "
                                f"({sorted(runner.inputs)}).")
    return Opened(meta, runner, "multitask" if meta.tasks else "single", profile_max_batch(sidecar), meta.precision)


def engine_io(side: dict, meta) -> tuple[list[dict], list[dict], tuple[int, int] | None]:
    """An engine's inputs and outputs from its sidecar, and its profile's ``(min, max)`` batch.

    Every engine input is declared: the image and, for a multi-task engine, its per-sample ``task_id`` (int64,
    the metadata's ``extra["task_input"]``); each batch-aligned input has a profile entry. A fixed-batch
    engine (profile min = max) keeps its batch in the shapes.
    """
    profiles = {p.get("input"): p for p in side.get("profiles") or []}
    first = (side.get("profiles") or [{}])[0]
    rng = (int(first["min"][0]), int(first["max"][0])) if first.get("min") and first.get("max") else None
    fixed = rng is not None and rng[0] == rng[1]

    def shape(name, declared):
        p = profiles.get(name)
        if p is not None:  # the profile's max shape, batch first
            dims = list(p["max"])
            return dims if fixed else ["batch", *dims[1:]]
        return list(declared)

    inputs = [{"name": meta.input["name"], "dtype": meta.input.get("dtype", "float32"),
               "shape": shape(meta.input["name"], meta.input["shape"])}]
    spec = (meta.extra or {}).get("task_input") or {}
    if meta.tasks or spec:
        name = str(spec.get("name", "task_id"))
        inputs.append({"name": name, "dtype": str(spec.get("dtype", "int64")),
                       "shape": shape(name, spec.get("shape") or ["batch"])})
    out_shape = list(meta.output["shape"])
    if fixed:
        out_shape = [rng[0], *out_shape[1:]]
    outputs = [{"name": meta.output["name"], "dtype": "float32", "shape": out_shape}]
    return inputs, outputs, rng


def engine_file_io(path):
    """``(metadata, inputs, outputs, profile (min, max) batch)`` of an engine as a server sees it
    (:func:`engine_io`)."""
    from atexport.artifact.sidecar import sidecar_metadata

    side = read_sidecar(path, "--model")
    meta = sidecar_metadata(side, f"--model {path}")
    return (meta, *engine_io(side, meta))
