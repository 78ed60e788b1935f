"""The ``atexport trt`` stage: (checkpoint ->) FP32 ONNX -> precision ONNX (verified) -> engine (verified).

:func:`export_tensorrt` validates every option before any work starts (a malformed ``--batch`` fails the
same with ``--build no`` as with a build), refuses options that do not apply to what was asked for (INT8
calibration flags with FP16, engine flags with ``--build no``...), checks that a checkpoint given as the
parity reference is the one the ONNX model was exported from, and only then converts and builds. Options
are grouped: :class:`~atexport.export.precision.options.Int8Options` (calibration, layers kept float,
target) and :class:`~atexport.export.tensorrt.plan.EngineOptions` (the build: whether, where, how).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError, IncompatibleCheckpointError, MissingDependencyError
from atexport.export.precision.options import Int8Options
from atexport.export.tensorrt.build import BuildResult, build_engine
from atexport.export.tensorrt.plan import (BuildPlan, EngineOptions, check_batch_for_model, check_refit_for_model,
                                           default_timing_cache, is_jetson, plan_build, quantized_consumers)
from atexport.runtime.tensorrt import cuda_device, tensorrt_version

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


def _refuse(flags: list[str], why: str) -> None:
    if flags:
        verb = "applies" if len(flags) == 1 else "apply"
        raise BadInputError(f"{', '.join(flags)} {verb} {why}.")


def _no_engine_message(what: str, path: Path, precision: str, extra_flags: str) -> str:
    return (
        f"{what}, so no engine was built; the {precision} ONNX model {path} is ready (verified with ONNX Runtime): "
        f"build the engine on the GPU machine with: atexport trt --onnx {path} --precision {precision}{extra_flags}"
    )


def parity_missing(torch_reference: bool, images) -> list[str]:
    """The pip packages the engine's parity check needs and this machine lacks (Jetson images often do)."""
    need = []
    if not torch_reference:
        need.append(("onnxruntime", "onnxruntime"))
    if images is None:
        need.append(("skimage", "scikit-image"))
    return [pip for mod, pip in need if importlib.util.find_spec(mod) is None]


def _check_reference(meta, ckpt, onnx) -> None:
    """Item: a checkpoint given as the parity reference must be the one the model was exported from."""
    from atexport.artifact.fit import check_exported_from

    where = f"--onnx {onnx}"
    if meta.tasks:
        raise BadInputError(
            f"{where} is a multi-task model, checked task by task against its own ONNX model; --ckpt does not apply "
            "(to change a task use 'atexport tasks add --replace')."
        )
    try:
        check_exported_from(meta, ckpt.task_weights(), where)
    except IncompatibleCheckpointError as e:
        raise IncompatibleCheckpointError(f"--ckpt {ckpt.path}: not the checkpoint {onnx} was exported from: {e}") from None


def export_tensorrt(onnx: str | os.PathLike | None = None, ckpt=None, *, precision: str = "fp16",
                    precision_output: str | os.PathLike | None = None, int8: Int8Options | None = None,
                    engine: EngineOptions | None = None, verify: bool = True, images=None, backbone_weights=None,
                    log=None) -> TrtExportResult:
    """The ``atexport trt`` stage as one function.

    Exports ``ckpt`` to ONNX first when no ``onnx`` is given (separable when ``engine.refit``); converts the
    FP32 model to ``precision`` (:func:`atexport.export.precision.convert_precision`, verified with ONNX
    Runtime and written atomically); then plans and builds the engine from exactly that file and checks the
    engine's parity. Without TensorRT or a GPU it stops with one :class:`MissingDependencyError` sentence
    *after* writing the precision ONNX, which another machine can build from.

    Args:
        onnx: an atexport ONNX model (FP32, or already of ``precision``).
        ckpt: the checkpoint: exported when ``onnx`` is missing; otherwise the PyTorch parity reference, which
            must be the checkpoint ``onnx`` was exported from.
        precision: ``fp32``, ``fp16`` or ``int8``.
        precision_output: precision ONNX path (default ``<stem>.fp16.onnx`` / ``<stem>.int8.onnx``).
        int8: INT8 options (only with ``precision="int8"``).
        engine: the engine options: whether to build (``engine.build``: ``yes``, ``auto`` or ``no``), the
            engine path (``engine.output``) and how to build (not with ``build="no"`` or an INT8 ``cpu`` target).
        verify: check parity of the precision model and of the engine.
        images: extra real images for parity.
        backbone_weights: local backbone weights for ``ckpt``.
        log: optional callable receiving progress lines.

    Raises:
        BadInputError: an invalid option, or one that does not apply (exit 2).
        IncompatibleCheckpointError: ``ckpt`` is not the model's checkpoint (exit 3).
        MissingDependencyError: no TensorRT or GPU with ``build="yes"`` (exit 4).
        ParityError: the precision model or the engine fails its parity check (exit 5).
    """
    from atexport.artifact.onnx import read_onnx_model

    run = _Run(precision=precision, int8=int8 if int8 is not None else Int8Options(),
               eng=engine if engine is not None else EngineOptions(), verify=verify, images=images, log=log)
    # -- every option, before any work
    _check_flags(run, onnx, ckpt, backbone_weights)
    src_meta = _check_source(run, onnx, precision_output)
    ckpt = _load_reference_ckpt(ckpt, src_meta, onnx)
    # -- (export,) convert
    if onnx is None:
        onnx = _export_first(run, ckpt, backbone_weights)
        _, src_meta = read_onnx_model(onnx)
        check_batch_for_model(src_meta, run.eng.batch)
    onnx = Path(onnx)
    if ckpt is not None and verify:
        from atexport.checkpoint import build_model
        from atexport.runtime.torch import TorchRunner

        run.reference = TorchRunner(build_model(ckpt, backbone_weights=backbone_weights), name="pytorch")
    result = TrtExportResult(onnx_path=onnx, precision_onnx=onnx)
    if src_meta.precision == precision:
        run.say(f"{onnx} is already {precision}; building from it as it is.")
    else:
        _convert(run, result, onnx, precision_output)
    path = Path(result.precision_onnx)
    model, meta = read_onnx_model(path)
    if precision == "int8" and (meta.extra or {}).get("precision", {}).get("target") == "cpu":
        result.note = (f"INT8 target 'cpu' makes an ONNX Runtime model (U8S8); no TensorRT engine is built from it: "
                       f"{path}")
        return result
    if run.eng.build == "no":
        result.note = f"no engine requested (--build no); the {precision} ONNX model is {path}"
        return result
    # -- the engine
    found = _tensorrt_and_gpu(run, path, result)
    if found is not None:
        _build_and_check(run, result, path, (model, meta), found)
    return result


@dataclass
class _Run:
    """One :func:`export_tensorrt` call: its settings and what the steps hand on."""

    precision: str
    int8: Int8Options
    eng: EngineOptions
    verify: bool
    images: Any
    log: Any
    reference: Any = None  # the PyTorch runner of --ckpt, when verifying

    @property
    def say(self):
        return self.log or (lambda *_: None)


def _check_flags(run: _Run, onnx, ckpt, backbone_weights) -> None:
    """The options alone: known values, and none that does not apply to what was asked for."""
    from atexport.export.precision import PRECISIONS

    precision, int8, eng = run.precision, run.int8, run.eng
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision {precision}: expected one of {PRECISIONS}.")
    if onnx is None and ckpt is None:
        raise BadInputError("give the model: --onnx MODEL.onnx (from 'atexport onnx') or --ckpt run.pt.")
    if precision != "int8":
        _refuse(int8.given(), f"to --precision int8, not {precision}")
    engine_flags = eng.given()
    if eng.build == "no":
        _refuse(engine_flags, "to the engine build; --build no stops after the precision ONNX model")
    if int8.target == "cpu":
        _refuse(engine_flags + (["--refit"] if eng.refit else []),
                "to a TensorRT engine; --target cpu makes an ONNX Runtime model and builds no engine")
    if not run.verify and run.images is not None:
        raise BadInputError("--images adds photos to the parity check; it does not apply with --no-verify.")
    if backbone_weights is not None and ckpt is None:
        raise BadInputError("--backbone-weights rebuilds the PyTorch model of --ckpt; give --ckpt or drop it.")


def _check_source(run: _Run, onnx, precision_output):
    """The options against the given ONNX model (its metadata, or ``None`` when there is none yet), and the
    calibration images INT8 needs."""
    from atexport.artifact.onnx import read_onnx_model

    precision, int8, eng = run.precision, run.int8, run.eng
    src_meta = None
    if onnx is not None:
        _, src_meta = read_onnx_model(onnx)
        if src_meta.precision not in ("fp32", precision):
            raise BadInputError(
                f"--onnx {onnx} is a {src_meta.precision} model; give the FP32 model from 'atexport onnx' to make "
                f"{precision}."
            )
        if src_meta.precision == precision:
            _refuse(int8.given() + (["--onnx-out"] if precision_output is not None else []),
                    f"to converting a model; {onnx} is already {precision}")
        check_batch_for_model(src_meta, eng.batch)
        if eng.refit:
            check_refit_for_model(src_meta)
    if precision == "int8" and int8.calib is None and (src_meta is None or src_meta.precision != "int8"):
        from atexport.export.precision import available_sets

        raise BadInputError(
            "INT8 needs calibration images: --calib NAME (sets: " + ", ".join(available_sets()) + ") or --calib DIR "
            "(a folder of the task's images)."
        )
    return src_meta


def _load_reference_ckpt(ckpt, src_meta, onnx):
    """The checkpoint, loaded; one given with an ONNX model must be the one the model was exported from."""
    if ckpt is None:
        return None
    from atexport.checkpoint import Checkpoint, load_checkpoint

    ckpt = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    if src_meta is not None:
        _check_reference(src_meta, ckpt, onnx)
    return ckpt


def _export_first(run: _Run, ckpt, backbone_weights):
    """Export ``ckpt`` to FP32 ONNX (separable for a refit build); returns the path."""
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    run.say("exporting the checkpoint to ONNX first ...")
    res = export_onnx(ckpt, None, ExportSettings(separable=bool(run.eng.refit), verify=run.verify,
                                                 backbone_weights=backbone_weights, images=run.images, log=run.log))
    return res.path


def _convert(run: _Run, result: TrtExportResult, onnx: Path, precision_output) -> None:
    """The FP32 model to ``run.precision`` (verified with ONNX Runtime, written atomically), into ``result``."""
    from atexport.export.precision import convert_precision

    precision, say = run.precision, run.say
    result.precision = convert_precision(onnx, precision, precision_output,
                                         int8=run.int8 if precision == "int8" else None, verify=run.verify,
                                         reference=run.reference, images=run.images, log=run.log)
    result.precision_onnx = Path(result.precision.path)
    say(result.precision.summary())
    if result.precision.parity:
        from atexport.parity.compare import format_table

        say(f"parity of the {precision} ONNX model against {result.precision.reference}:")
        say(format_table(result.precision.parity))
    say(f"wrote {result.precision.path}")


def _tensorrt_and_gpu(run: _Run, path: Path, result: TrtExportResult):
    """``(TensorRT version, CUDA device)``, or ``None`` with a note when ``build`` is ``auto`` and either is
    missing (with ``yes``: one :class:`MissingDependencyError` sentence naming the command to run elsewhere)."""
    precision, eng = run.precision, run.eng
    version = tensorrt_version()
    try:
        if version is None:
            raise MissingDependencyError(_no_engine_message(
                "TensorRT is not installed here (pip install 'atexport[tensorrt]' on a GPU machine)", path, precision,
                eng.flags()))
        try:
            device = cuda_device()
        except MissingDependencyError as e:
            raise MissingDependencyError(
                _no_engine_message(f"no CUDA GPU is visible here ({e})", path, precision, eng.flags())) from None
    except MissingDependencyError as e:
        if eng.build == "auto":
            result.note = str(e)
            return None
        raise
    return version, device


def _build_and_check(run: _Run, result: TrtExportResult, path: Path, model_meta, found) -> None:
    """Plan and build the engine from ``path``, then check its parity (kept as ``.failed`` when it fails)."""
    model, meta = model_meta
    version, device = found
    eng = run.eng
    output = eng.output if eng.output is not None else path.with_suffix(".engine")
    cc = tuple(device["compute_capability"])
    if eng.timing_cache is None:
        eng = replace(eng, timing_cache=default_timing_cache(output, version, device))
    quantized = None
    if eng.refit and meta.precision == "int8" and not meta.tasks:
        quantized = quantized_consumers(model, [str(e.get("initializer", k)) for k, e in meta.manifest.items()])
    plan = plan_build(meta, version, eng, device_cc=cc, jetson=is_jetson(), quantized=quantized)
    result.plan = plan
    built = build_engine(path, output, plan, meta=meta, log=run.log)
    result.engine = built
    if run.verify:
        _check_engine(run, result, meta, plan)


def _check_engine(run: _Run, result: TrtExportResult, meta, plan: BuildPlan) -> None:
    """The engine's parity into its sidecar (or a note when this machine cannot check it)."""
    built, precision, images = result.engine, run.precision, run.images
    missing = parity_missing(run.reference is not None and not meta.tasks, images)
    if missing:
        result.note = (f"engine built, parity skipped because {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} missing here; install with: "
                       f"pip install {' '.join(missing)} (then check it with 'atexport verify')")
        built.sidecar["parity_skipped"] = result.note
    else:
        from atexport.export.tensorrt.verify import keep_failed, verify_engine

        result.parity = verify_engine(built.path, run.reference, result.onnx_path, meta, precision, images=images,
                                      log=run.log, batch_range=(plan.profiles[0].min[0], plan.profiles[0].max[0]))
        built.sidecar["parity"] = [r.to_dict() for r in result.parity]
    from atexport.utils.io import atomic_write_json

    atomic_write_json(built.sidecar_path, built.sidecar)
    if result.parity and not all(r.passed for r in result.parity):
        keep_failed(built.path, built.sidecar_path, result.parity, f"the {precision} engine")
