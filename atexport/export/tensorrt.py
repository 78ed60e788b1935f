"""The small part of atexport that touches TensorRT: build, refit, load (with the sidecar check).

Everything version-dependent is decided in :mod:`atexport.export.trt_plan`; this module replays a
:class:`~atexport.export.trt_plan.BuildPlan` through TensorRT's Python API, which is the same on 10.x
and 11.x for what is used here:

* ``trt.Builder(logger)``, ``builder.create_network(flags)`` (``1 << int(NetworkDefinitionCreationFlag.X)``),
  ``trt.OnnxParser(network, logger).parse_from_file(path)`` with ``num_errors``/``get_error(i)``;
* ``builder.create_builder_config()``, ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)``,
  ``config.set_flag``/``clear_flag(BuilderFlag.X)``, ``config.hardware_compatibility_level``,
  ``config.builder_optimization_level``;
* ``builder.create_optimization_profile()``, ``profile.set_shape(name, min, opt, max)``,
  ``config.add_optimization_profile(profile)``;
* ``config.create_timing_cache(bytes)``, ``config.set_timing_cache(cache, ignore_mismatch=False)``,
  ``config.get_timing_cache().serialize()``;
* ``network.mark_weights_refittable(name)`` (with ``BuilderFlag.REFIT_INDIVIDUAL``);
* ``builder.build_serialized_network(network, config)`` (``None`` on failure);
* ``trt.Runtime(logger).deserialize_cuda_engine(bytes)``, ``runtime.engine_host_code_allowed``;
* ``trt.Refitter(engine, logger)``, ``get_all_weights()``, ``set_named_weights(name, trt.Weights(array))``,
  ``get_missing_weights()``, ``refit_cuda_engine()``; ``engine.serialize()``.

TensorRT and the CUDA device are imported and queried lazily; without them every entry point stops with
one :class:`~atexport.errors.MissingDependencyError` sentence.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atexport.errors import AtexportError, BadInputError, IncompatibleCheckpointError, MissingDependencyError
from atexport.export.trt_plan import BuildPlan, check_compatible, engine_sidecar, sidecar_path


def _trt():
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
        return str(_trt().__version__)
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


def require_tensorrt() -> tuple[Any, dict]:
    """TensorRT module and the GPU, or one clear :class:`MissingDependencyError`."""
    trt = _trt()
    return trt, cuda_device()


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


@dataclass
class BuildResult:
    """What :func:`build_engine` produced."""

    path: Path
    sidecar_path: Path
    sidecar: dict
    plan: BuildPlan
    seconds: dict = field(default_factory=dict)
    parity: list = field(default_factory=list)


def build_engine(onnx_path: str | os.PathLike, output: str | os.PathLike, plan: BuildPlan, *, meta=None, log=None) -> BuildResult:
    """Build a serialized engine from exactly ``onnx_path`` following ``plan``; write it and its sidecar.

    Args:
        onnx_path: the (precision) ONNX model.
        output: engine path; the sidecar goes to ``<output>.json``.
        plan: from :func:`atexport.export.trt_plan.plan_build`.
        meta: the model's metadata (read from ``onnx_path`` when omitted).
        log: optional callable receiving progress lines.
    """
    from atexport.utils.io import atomic_write_bytes, atomic_write_json, check_writable, sha256_file

    say = log or (lambda *_: None)
    trt, device = require_tensorrt()
    output = check_writable(output, "-o")
    if meta is None:
        from atexport.export.swap import read_onnx
        from atexport.metadata import read_onnx_metadata

        meta = read_onnx_metadata(read_onnx(onnx_path), str(onnx_path))
    logger = _Logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 0
    for f in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, f))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise AtexportError(f"TensorRT {plan.tensorrt}'s ONNX parser rejected {onnx_path}: {'; '.join(errs[:3])}.")
    config = builder.create_builder_config()
    if plan.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_bytes))
    flag_names = list(plan.builder_flags)
    if plan.refittable_weights and not hasattr(network, "mark_weights_refittable"):
        # Older 10.x bindings: whole-engine refit instead of individually marked weights.
        flag_names = ["REFIT" if f == "REFIT_INDIVIDUAL" else f for f in flag_names]
        say("this TensorRT has no mark_weights_refittable; building with BuilderFlag.REFIT (all weights refittable)")
    for f in flag_names:
        config.set_flag(getattr(trt.BuilderFlag, f))
    for f in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, f))
    if plan.hardware_compatibility:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compatibility)
    if plan.optimization_level is not None:
        config.builder_optimization_level = int(plan.optimization_level)
    profile = builder.create_optimization_profile()
    for p in plan.profiles:
        profile.set_shape(p.input, tuple(p.min), tuple(p.opt), tuple(p.max))
    config.add_optimization_profile(profile)
    if "REFIT_INDIVIDUAL" in flag_names:
        for name in plan.refittable_weights:
            if not network.mark_weights_refittable(name):
                raise AtexportError(f"TensorRT cannot mark {name} refittable: it is not a weight of the parsed network.")
    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
        say(f"timing cache: {'reusing' if data else 'creating'} {cache_path}")
    say(f"building the {plan.precision} engine (TensorRT {plan.tensorrt}, {device['name']}) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AtexportError(
            f"TensorRT {plan.tensorrt} could not build the engine: {'; '.join(logger.errors[-3:]) or 'see the log above'}."
        )
    engine_bytes = bytes(serialized)
    seconds = {"build": time.perf_counter() - t0}
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    atomic_write_bytes(output, engine_bytes)
    from hashlib import sha256

    sidecar = engine_sidecar(
        meta, plan, device=device, engine_path=output, engine_sha256=sha256(engine_bytes).hexdigest(),
        engine_bytes=len(engine_bytes), onnx_path=Path(onnx_path).resolve(), onnx_sha256=sha256_file(onnx_path),
        seconds=seconds,
    )
    side = atomic_write_json(sidecar_path(output), sidecar)
    return BuildResult(path=Path(output), sidecar_path=side, sidecar=sidecar, plan=plan, seconds=seconds)


def read_sidecar(engine_path: str | os.PathLike) -> dict:
    """The sidecar of an engine; a clear error when it is missing or does not describe this engine file."""
    from atexport.utils.io import require_file, sha256_file

    engine_path = require_file(engine_path, "--engine", "engine file")
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise BadInputError(
            f"--engine {engine_path}: its sidecar {side.name} is missing; atexport needs it to know the model's "
            "preprocessing, classes and what the engine was built for. Rebuild the engine with 'atexport trt'."
        )
    try:
        doc = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{side}: not valid JSON ({e}).") from None
    want = doc.get("engine", {}).get("sha256")
    if want and sha256_file(engine_path) != want:
        raise BadInputError(
            f"--engine {engine_path}: the engine file changed since {side.name} was written (sha256 differs); "
            "rebuild it with 'atexport trt' or restore the matching sidecar."
        )
    return doc


def load_engine(engine_path: str | os.PathLike, *, log=None):
    """Check the sidecar against this machine, then deserialize the engine.

    Returns:
        ``(trt, runtime, engine, sidecar)``.

    Raises:
        IncompatibleCheckpointError: built for another GPU or TensorRT version (says which, and the command
            that rebuilds it here).
    """
    say = log or (lambda *_: None)
    sidecar = read_sidecar(engine_path)
    trt, device = require_tensorrt()
    sidecar["engine"] = {**sidecar.get("engine", {}), "path": str(engine_path)}  # the rebuild command's -o
    for w in check_compatible(sidecar, str(trt.__version__), device, where=f"engine {engine_path}"):
        say(f"warning: {w}")
    logger = _Logger(trt)
    runtime = trt.Runtime(logger)
    if sidecar.get("build", {}).get("engine_host_code_allowed"):
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        from atexport.export.trt_plan import rebuild_command

        raise IncompatibleCheckpointError(
            f"TensorRT {trt.__version__} could not load engine {engine_path} "
            f"({'; '.join(logger.errors[-2:]) or 'deserialization failed'}); rebuild it on this device: "
            f"{rebuild_command(sidecar)}"
        )
    return trt, runtime, engine, sidecar


@dataclass
class RefitResult:
    """What :func:`refit_engine` wrote."""

    path: Path
    sidecar: dict
    refitted: int
    seconds: dict = field(default_factory=dict)


def refit_engine(engine_path: str | os.PathLike, ckpt, output: str | os.PathLike | None = None, *, task_name: str | None = None, log=None) -> RefitResult:
    """Refit a refittable engine with another task's adapter and head weights, without rebuilding.

    The checkpoint is checked against the engine's metadata exactly like ``atexport swap`` checks an ONNX
    model (backbone fingerprint, adapter rank and placement, class count); misfits are refused.

    A multi-task engine (built with ``--refit`` from a multi-task model) gets one task's slice of every bank
    tensor replaced (:func:`atexport.export.multitask.refit_banks`): the task must be in the model and its
    head within ``max_classes``. The other tasks' current weights come from
    :func:`atexport.export.trt_plan.bank_source`; the new bank is written beside the output
    (``<output>.bank.npz``) for the next refit.

    Every check on the sidecar and the checkpoint runs before TensorRT is needed.

    Args:
        engine_path: an engine built with ``atexport trt --refit`` from a separable or multi-task model.
        ckpt: the other task's checkpoint (path or loaded).
        output: engine to write (default: ``<checkpoint stem>.engine`` beside the engine; a multi-task engine
            is refitted in place); the sidecar is written beside it with the new task's metadata.
        task_name: task name in the metadata (default: the checkpoint's file stem); for a multi-task engine,
            the task to replace.
        log: optional callable receiving progress lines.
    """
    from atexport.export.swap import load_task_weights
    from atexport.metadata import ModelMetadata
    from atexport.utils.io import atomic_write_bytes, atomic_write_json, check_writable

    t0 = time.perf_counter()
    sidecar = read_sidecar(engine_path)
    meta = ModelMetadata(**{k: v for k, v in sidecar["metadata"].items() if k in ModelMetadata.__dataclass_fields__})
    refittable = sidecar.get("build", {}).get("refittable_weights") or []
    if not refittable:
        raise BadInputError(
            f"--engine {engine_path} is not refittable; rebuild it from a separable model with "
            "'atexport trt --onnx MODEL.onnx --refit'."
        )
    from atexport.checkpoint import Checkpoint, load_checkpoint

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    where = f"engine {engine_path}"
    if meta.tasks:  # multi-task: replace one task's slice of each bank tensor
        from atexport.export.multitask import default_task_name, read_banks, refit_banks
        from atexport.export.trt_plan import bank_path, bank_source

        task_name = str(task_name or default_task_name(ckpt))
        weights, tasks = refit_banks(meta, read_banks(bank_source(sidecar, engine_path), meta, where), ckpt,
                                     task_name, where)
        output = engine_path if output is None else output
    else:
        weights = load_task_weights(ckpt, meta, where)  # refuses misfits exactly like the ONNX swap
    if output is None:
        if ckpt.path is None:
            raise BadInputError("give an output path (-o): the checkpoint was not loaded from a file.")
        output = Path(engine_path).with_name(Path(ckpt.path).stem + Path(engine_path).suffix)
    output = check_writable(output, "-o")
    trt, runtime, engine, _ = load_engine(engine_path, log=log)
    logger = _Logger(trt)
    refitter = trt.Refitter(engine, logger)
    names = set(refitter.get_all_weights())
    missing_in_engine = [n for n in refittable if n not in names]
    if missing_in_engine:
        raise IncompatibleCheckpointError(f"{where}: weights {missing_in_engine[:5]} are not refittable in this engine.")
    keep_alive = []
    for init in refittable:
        arr = np.ascontiguousarray(weights[init], dtype=np.float32)
        keep_alive.append(arr)
        if not refitter.set_named_weights(init, trt.Weights(arr)):
            raise IncompatibleCheckpointError(f"{where}: TensorRT refused new values for {init} (shape {list(arr.shape)}).")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise AtexportError(f"{where}: refit incomplete, TensorRT still needs {missing[:5]}.")
    if not refitter.refit_cuda_engine():
        raise AtexportError(f"{where}: TensorRT refit failed ({'; '.join(logger.errors[-2:])}).")
    data = bytes(engine.serialize())
    from hashlib import sha256

    from atexport.utils.io import sha256_file

    new = json.loads(json.dumps(sidecar))
    if meta.tasks:  # the bank now in the engine, for the next refit (TensorRT does not hand it back)
        import io

        buf = io.BytesIO()
        np.savez(buf, **weights)
        bank = atomic_write_bytes(bank_path(output), buf.getvalue())
        new["bank"] = {"path": bank.name, "sha256": sha256_file(bank)}
    atomic_write_bytes(output, data)
    new["engine"] = {"path": Path(output).name, "sha256": sha256(data).hexdigest(), "bytes": len(data)}
    md = new["metadata"]
    if meta.tasks:
        md["tasks"] = json.loads(json.dumps(tasks))
    else:
        md["task"] = task_name or ckpt.name
        md["class_names"] = list(ckpt.model.class_names) if ckpt.model.class_names else md.get("class_names")
        md["num_classes"] = int(ckpt.model.num_classes)
    md.setdefault("extra", {})["refit"] = {"from_engine": Path(engine_path).name, "from_task": sidecar["metadata"].get("task"),
                                           "task": task_name or ckpt.name,
                                           "checkpoint": Path(ckpt.path).name if ckpt.path else None}
    new["parity"] = []
    atomic_write_json(sidecar_path(output), new)
    return RefitResult(path=Path(output), sidecar=new, refitted=len(refittable), seconds={"refit": time.perf_counter() - t0})


# --------------------------------------------------------------------------------------------------
# The `atexport trt` stage: (checkpoint ->) FP32 ONNX -> precision ONNX (verified) -> engine (verified)
# --------------------------------------------------------------------------------------------------


@dataclass
class TrtExportResult:
    """What :func:`export_tensorrt` produced; ``engine`` is ``None`` when no engine was built."""

    onnx_path: Path
    precision_onnx: Path
    precision: Any = None  # PrecisionResult, when a conversion ran
    plan: BuildPlan | None = None
    engine: BuildResult | None = None
    parity: list = field(default_factory=list)
    note: str | None = None


def _no_engine_message(what: str, path: Path, precision: str, extra_flags: str) -> str:
    return (
        f"{what}, so no engine was built; the {precision} ONNX model {path} is ready (verified with ONNX Runtime): "
        f"build the engine on the GPU machine with: atexport trt --onnx {path} --precision {precision}{extra_flags}"
    )


def export_tensorrt(
    onnx: str | os.PathLike | None = None,
    ckpt=None,
    *,
    precision: str = "fp16",
    output: str | os.PathLike | None = None,
    precision_output: str | os.PathLike | None = None,
    calib=None,
    calib_count: int | None = None,
    calib_method: str | None = None,
    calib_cache: str | os.PathLike | bool | None = None,
    int8_keep_float=None,
    target: str = "tensorrt",
    batch: str | None = None,
    workspace_gb: float | None = None,
    refit: bool = False,
    version_compatible: bool = False,
    hardware_compatible: bool | str = False,
    timing_cache: str | os.PathLike | None = None,
    optimization_level: int | None = None,
    verify: bool = True,
    images=None,
    backbone_weights=None,
    build: str = "yes",
    log=None,
) -> TrtExportResult:
    """The ``atexport trt`` stage as one function.

    Exports ``ckpt`` to ONNX first when no ``onnx`` is given (separable when ``refit``); converts the FP32
    model to ``precision`` (:func:`atexport.export.precision.convert_precision`, verified with ONNX
    Runtime and written atomically); then plans and builds the engine from exactly that file and checks the
    engine's parity. Without TensorRT or a GPU it stops with one :class:`MissingDependencyError` sentence
    *after* writing the precision ONNX, which another machine can build from.

    Args:
        onnx: an atexport ONNX model (FP32, or already of ``precision``).
        ckpt: the checkpoint: exported when ``onnx`` is missing; otherwise the PyTorch parity reference.
        precision: ``fp32``, ``fp16`` or ``int8``.
        output: engine path (default ``<precision model stem>.engine``).
        precision_output: precision ONNX path (default ``<stem>.fp16.onnx`` / ``<stem>.int8.onnx``).
        calib, calib_count, calib_method, calib_cache, int8_keep_float, target: INT8 calibration and the
            Linear layers kept in float (see
            :func:`~atexport.export.precision.quantize_int8`); ``target="cpu"`` makes an ONNX Runtime model
            and builds no engine.
        batch, workspace_gb, refit, version_compatible, hardware_compatible, timing_cache,
            optimization_level: the engine build (see :func:`~atexport.export.trt_plan.plan_build`).
        verify: check parity of the precision model and of the engine.
        images: extra real images for parity.
        backbone_weights: local backbone weights for ``ckpt``.
        build: ``yes`` builds the engine (no TensorRT or GPU is an error), ``auto`` builds it where
            TensorRT and a GPU exist and otherwise stops after the precision ONNX with a note, ``no``
            stops after the precision ONNX.
        log: optional callable receiving progress lines.
    """
    from atexport.export.precision import PRECISIONS, convert_precision
    from atexport.export.swap import read_onnx
    from atexport.export.trt_plan import default_timing_cache, plan_build
    from atexport.metadata import read_onnx_metadata

    say = log or (lambda *_: None)
    if build not in ("yes", "auto", "no"):
        raise BadInputError(f"--build {build}: expected yes, auto or no.")
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision {precision}: expected one of {PRECISIONS}.")
    if onnx is None and ckpt is None:
        raise BadInputError("give the model: --onnx MODEL.onnx (from 'atexport onnx') or --ckpt run.pt.")
    if precision == "int8" and calib is None:
        in_prec = None
        if onnx is not None:
            in_prec = read_onnx_metadata(read_onnx(onnx), str(onnx)).precision
        if in_prec != "int8":
            from atexport.export.calibration import available_sets

            raise BadInputError(
                "INT8 needs calibration images: --calib NAME (sets: " + ", ".join(available_sets()) + ") or --calib DIR "
                "(a folder of the task's images)."
            )
    reference, torch_model = None, None
    if ckpt is not None:
        from atexport.checkpoint import Checkpoint, build_model, load_checkpoint

        ckpt = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    if onnx is None:
        from atexport.export.onnx import export_onnx

        say("exporting the checkpoint to ONNX first ...")
        res = export_onnx(ckpt, separable=bool(refit), verify=verify, backbone_weights=backbone_weights, images=images, log=log)
        onnx = res.path
    onnx = Path(onnx)
    src_meta = read_onnx_metadata(read_onnx(onnx), str(onnx))
    if ckpt is not None and verify:
        from atexport.runtime.torch import TorchRunner

        torch_model = build_model(ckpt, backbone_weights=backbone_weights)
        reference = TorchRunner(torch_model, name="pytorch")
    result = TrtExportResult(onnx_path=onnx, precision_onnx=onnx)
    if src_meta.precision == precision:
        say(f"{onnx} is already {precision}; building from it as it is.")
    elif src_meta.precision == "fp32":
        kwargs = {"verify": verify, "reference": reference, "images": images, "log": log}
        if precision == "int8":
            kwargs.update(target=target, method=calib_method, count=calib_count, cache=calib_cache,
                          keep_float=int8_keep_float)
        result.precision = convert_precision(onnx, precision, precision_output, calibration=calib, **kwargs)
        result.precision_onnx = result.precision.path
        say(result.precision.summary())
        if result.precision.parity:
            from atexport.verify.compare import format_table

            say(f"parity of the {precision} ONNX model against {result.precision.reference}:")
            say(format_table(result.precision.parity))
        say(f"wrote {result.precision.path}")
    else:
        raise BadInputError(
            f"--onnx {onnx} is a {src_meta.precision} model; give the FP32 model from 'atexport onnx' to make {precision}."
        )
    path = Path(result.precision_onnx)
    meta = read_onnx_metadata(read_onnx(path), str(path))
    flags = "".join([f" --batch {batch}" if batch else "", " --refit" if refit else "",
                     " --version-compatible" if version_compatible else "",
                     " --hardware-compatible" if hardware_compatible else ""])
    if precision == "int8" and (meta.extra or {}).get("precision", {}).get("target") == "cpu":
        result.note = f"INT8 target 'cpu' makes an ONNX Runtime model (U8S8); no TensorRT engine is built from it: {path}"
        return result
    if build == "no":
        result.note = f"no engine requested (--build no); the {precision} ONNX model is {path}"
        return result
    version = tensorrt_version()
    try:
        if version is None:
            raise MissingDependencyError(_no_engine_message(
                "TensorRT is not installed here (pip install 'atexport[tensorrt]' on a GPU machine)", path, precision,
                flags))
        try:
            device = cuda_device()
        except MissingDependencyError:
            raise MissingDependencyError(
                _no_engine_message("no CUDA GPU is visible here", path, precision, flags)) from None
    except MissingDependencyError as e:
        if build == "auto":
            result.note = str(e)
            return result
        raise
    if output is None:
        output = path.with_suffix(".engine")
    cc = tuple(device["compute_capability"])
    plan = plan_build(
        meta, version, batch=batch, workspace_gb=workspace_gb, refit=refit, version_compatible=version_compatible,
        hardware_compatible=hardware_compatible,
        timing_cache=timing_cache if timing_cache is not None else default_timing_cache(output, version, cc),
        optimization_level=optimization_level, device_cc=cc,
    )
    result.plan = plan
    build = build_engine(path, output, plan, meta=meta, log=log)
    result.engine = build
    if verify:
        result.parity = verify_engine(build.path, reference, onnx, meta, precision, images=images, log=log,
                                      batch_range=(plan.profiles[0].min[0], plan.profiles[0].max[0]))
        build.sidecar["parity"] = [r.to_dict() for r in result.parity]
        from atexport.utils.io import atomic_write_json

        atomic_write_json(build.sidecar_path, build.sidecar)
        if not all(r.passed for r in result.parity):
            from atexport.errors import ParityError
            from atexport.verify.compare import format_table

            failed = build.path.with_name(build.path.stem + ".failed" + build.path.suffix)
            os.replace(build.path, failed)
            os.replace(build.sidecar_path, sidecar_path(failed))
            raise ParityError(
                f"the {precision} engine does not match the reference within the {precision} tolerances:\n"
                f"{format_table(result.parity)}\nThe failing engine is kept at {failed}."
            )
    return result


def verify_engine(engine_path, reference, fp32_onnx, meta, precision: str, *, images=None, log=None, batch_range=None) -> list:
    """Parity of an engine against ``reference`` (PyTorch) or the FP32 ONNX model in ONNX Runtime."""
    from atexport.export.precision import load_precision_config
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.tensorrt import TensorRTRunner
    from atexport.verify.parity import check_parity, photo_batch

    par = load_precision_config()["parity"]
    if reference is None or meta.tasks:  # a multi-task engine is checked against its own ONNX model, task by task
        reference = OnnxRuntimeRunner(str(fp32_onnx), name="onnx-fp32")
    photos = photo_batch(meta.preprocess, extra=images, max_images=par.get("max_images"))
    b = meta.input["shape"][0]
    sizes = [int(b)] if isinstance(b, int) else [int(x) for x in par.get("batch_sizes", [1, 4])]
    if batch_range is not None:
        sizes = [s for s in sizes if batch_range[0] <= s <= batch_range[1]] or [int(batch_range[0])]
    ri = par.get("random_inputs", 0)
    ri = int(ri.get(precision, 0) if isinstance(ri, dict) else ri)
    (log or (lambda *_: None))(f"checking the engine's parity against {getattr(reference, 'name', 'reference')} ...")
    with reference as ref, TensorRTRunner(engine_path, log=log) as cand:
        pairs = [("", ref, cand)]
        if meta.tasks:  # multi-task engine: every task on its own (its task_id fed, its logits only)
            from atexport.export.multitask import task_runners

            pairs = [(f" {t['name']}", r, c) for (t, r), (_, c) in zip(task_runners(meta, ref), task_runners(meta, cand))]
        rows = []
        for suffix, r, c in pairs:
            rows += check_parity(r, c, photos, precision, random_inputs=ri,
                                 input_shape=[int(v) for v in meta.preprocess["input_size"]],
                                 batch_sizes=sizes, label=f"trt {precision}{suffix}")
        return rows
