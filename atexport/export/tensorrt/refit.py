"""Refitting a refittable engine with another task's adapter and head weights, without rebuilding.

TensorRT calls (the same on 10.x and 11.x): ``trt.Refitter(engine, logger)``, ``get_all_weights()``,
``set_named_weights(name, trt.Weights(array))``, ``get_missing_weights()``, ``refit_cuda_engine()``,
``engine.serialize()``.

A refit is checked like a build: the task must fit the engine (:func:`atexport.artifact.fit.check_fits`),
an INT8 engine is refitted only where the swapped tensors feed no quantized layer, and the refitted engine
is compared with the swapped ONNX model in ONNX Runtime (``atexport swap`` of the engine's own ONNX model)
before it is kept. The sidecar then records what the engine holds (the task, its weights' fingerprint)
and the ONNX model it can be rebuilt from (``<engine>.onnx``), so ``rebuild_command()`` rebuilds that task.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from atexport.artifact.sidecar import read_sidecar, sidecar_metadata, sidecar_path
from atexport.errors import AtexportError, BadInputError, IncompatibleCheckpointError


@dataclass
class RefitResult:
    """What :func:`refit_engine` wrote."""

    path: Path
    sidecar: dict
    refitted: int
    onnx_path: Path | None = None
    seconds: dict = field(default_factory=dict)
    parity: list = field(default_factory=list)


def refit_onnx_path(engine_path: str | os.PathLike) -> Path:
    """``cars.engine`` -> ``cars.engine.onnx``: the ONNX model holding what a refit put in the engine."""
    p = Path(engine_path)
    return p.with_name(p.name + ".onnx")


def _source_onnx(sidecar: dict, where: str, required: bool) -> Path | None:
    """The ONNX model the engine was built (or last refitted) from, checked by sha256; ``None`` if absent."""
    from atexport.utils.io import sha256_file

    rec = sidecar.get("onnx") or {}
    p = Path(rec["path"]) if rec.get("path") else None
    problem = None
    if p is None or not p.is_file():
        problem = f"the ONNX model it was built from ({rec.get('path')}) is not there"
    elif rec.get("sha256") and sha256_file(p) != rec["sha256"]:
        problem = f"the ONNX model it was built from ({p}) changed since (sha256 differs)"
    if problem is None:
        return p
    if required:
        raise BadInputError(
            f"{where}: {problem}; a refit is checked against that model with the new task swapped in, in ONNX "
            "Runtime. Put it back at that path, or rebuild the engine with 'atexport trt'."
        )
    return None


def check_int8_refit(sidecar: dict, meta, source: Path | None, where: str) -> None:
    """Refuse a refit of a single-task INT8 engine whose swapped tensors feed quantized layers.

    Engines built by this atexport were checked at build time (``build.int8_refit_checked``); for others the
    ONNX model they were built from is inspected.
    """
    from atexport.export.tensorrt.plan import quantized_consumers

    if meta.precision != "int8" or meta.tasks or (sidecar.get("build") or {}).get("int8_refit_checked"):
        return
    if source is None:
        raise BadInputError(
            f"{where} is INT8 and its ONNX model is not available to check that the swapped tensors feed no quantized "
            "layer; rebuild the engine with 'atexport trt --refit' from its INT8 ONNX model."
        )
    from atexport.artifact.onnx import read_onnx

    names = list((sidecar.get("build") or {}).get("refittable_weights") or [])
    hits = quantized_consumers(read_onnx(source), names)
    if hits:
        detail = "; ".join(f"{n} -> {', '.join(v[:3])}" for n, v in list(hits.items())[:4])
        raise BadInputError(
            f"{where} is INT8 and its swappable tensors feed quantized layers ({detail}), whose scales were calibrated "
            "for the old task: a refit would give wrong logits. Quantize a model of the new task (or keep those "
            "layers float with --int8-keep-float) and build its engine."
        )


def refit_engine(engine_path: str | os.PathLike, ckpt, output: str | os.PathLike | None = None, *,
                 task_name: str | None = None, verify: bool = True, images=None, log=None) -> RefitResult:
    """Refit a refittable engine with another task's adapter and head weights, without rebuilding.

    The checkpoint is checked against the engine's metadata exactly like ``atexport swap`` checks an ONNX
    model (backbone fingerprint, adapter rank and placement, class count); misfits are refused.

    A multi-task engine (built with ``--refit`` from a multi-task model) gets one task's slice of every bank
    tensor replaced (:func:`atexport.export.multitask.refit_banks`); the other tasks' current weights come
    from :func:`atexport.artifact.sidecar.bank_source`, and the new bank is written beside the output
    (``<output>.bank.npz``) for the next refit.

    Every check on the sidecar and the checkpoint runs before TensorRT is needed.

    Args:
        engine_path: an engine built with ``atexport trt --refit`` from a separable or multi-task model.
        ckpt: the other task's checkpoint (path or loaded).
        output: engine to write (default: ``<task name>.engine`` beside the engine, ``cars.engine`` for
            ``runs/cars/run.pt``, as every swap names its output; a multi-task engine
            is refitted in place).
        task_name: task name in the metadata (default: the checkpoint's default name); for a multi-task engine,
            the task to replace.
        verify: compare the refitted engine with the swapped ONNX model in ONNX Runtime (needs the ONNX model
            the engine was built from); a failing engine is kept as ``*.failed.engine`` and an error raised.
        images: extra real images for the parity check.
        log: optional callable receiving progress lines.

    Raises:
        BadInputError: not refittable, a missing source model, an INT8 engine whose swapped tensors are quantized.
        IncompatibleCheckpointError: the checkpoint does not fit.
        ParityError: the refitted engine does not match the swapped ONNX model.
    """
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.runtime.tensorrt import load_engine
    from atexport.utils.io import atomic_write_json, check_writable

    t0 = time.perf_counter()
    sidecar = read_sidecar(engine_path)
    meta = sidecar_metadata(sidecar, f"--engine {engine_path}")
    where = f"engine {engine_path}"
    refittable = sidecar.get("build", {}).get("refittable_weights") or []
    if not refittable:
        raise BadInputError(
            f"--engine {engine_path} is not refittable; rebuild it from a separable model with "
            "'atexport trt --onnx MODEL.onnx --refit'."
        )
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    source = _source_onnx(sidecar, where, required=verify)
    check_int8_refit(sidecar, meta, source, where)
    weights, tasks, task_name, output = _new_weights(sidecar, meta, engine_path, ckpt, task_name, output, where)
    if output is None:
        if ckpt.path is None:
            raise BadInputError("give an output path (-o): the checkpoint was not loaded from a file.")
        output = Path(engine_path).with_name(ckpt.name + Path(engine_path).suffix)  # named by the task, as every swap
    output = check_writable(output, "-o")
    trt, _runtime, engine, _ = load_engine(engine_path, log=log)
    onnx_out = None
    if source is not None:  # the ONNX model the refitted engine can be rebuilt from (and is checked against)
        onnx_out = _write_swapped_onnx(source, ckpt, output, task_name, meta)
    data = _refit(trt, engine, refittable, weights, where)
    seconds = {"refit": time.perf_counter() - t0}

    new = _refitted_sidecar(sidecar, meta, (engine_path, output, onnx_out), data, (weights, tasks), ckpt, task_name)
    side = atomic_write_json(sidecar_path(output), new)
    result = RefitResult(path=Path(output), sidecar=new, refitted=len(refittable), onnx_path=onnx_out, seconds=seconds)
    if verify and onnx_out is not None:
        _verify_refit(result, side, meta, images, log)
    return result


def _new_weights(sidecar: dict, meta, engine_path, ckpt, task_name, output, where: str):
    """The weights a refit puts in: ``(weights by initializer, multi-task tasks or None, task name, output)``.

    A multi-task engine gets one task's slice of every bank tensor replaced (and is refitted in place by
    default); a single-task engine gets the checkpoint's tensors, refused where they do not fit."""
    from atexport.artifact.fit import check_fits

    if meta.tasks:  # multi-task: replace one task's slice of each bank tensor
        from atexport.artifact.sidecar import bank_source
        from atexport.artifact.tasks import default_task_name
        from atexport.export.multitask import read_banks, refit_banks

        task_name = str(task_name or default_task_name(ckpt))
        weights, tasks = refit_banks(meta, read_banks(bank_source(sidecar, engine_path), meta, where), ckpt,
                                     task_name, where)
        output = engine_path if output is None else output
        return weights, tasks, task_name, output
    weights = check_fits(meta, ckpt.task_weights(task_name), where)  # refuses misfits exactly like the ONNX swap
    return weights, None, task_name or ckpt.name, output


def _write_swapped_onnx(source: Path, ckpt, output: Path, task_name: str, meta) -> Path:
    """The engine's ONNX model with the new task swapped in, beside the output (``<engine>.onnx``)."""
    onnx_out = refit_onnx_path(output)
    if meta.tasks:
        from atexport.export.multitask import add_task

        add_task(source, ckpt, onnx_out, name=task_name, replace=True)
    else:
        from atexport.export.swap import swap_onnx

        swap_onnx(source, ckpt, onnx_out, task_name=task_name)
    return onnx_out


def _refit(trt, engine, refittable, weights, where: str) -> bytes:
    """TensorRT's refit of ``engine`` with ``weights`` (by initializer name); returns the serialized engine."""
    from atexport.runtime.tensorrt import _Logger

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
    return bytes(engine.serialize())


def _refitted_sidecar(sidecar: dict, meta, paths, data: bytes, weights_tasks, ckpt, task_name: str) -> dict:
    """Write the refitted engine (and a multi-task engine's bank) and return its new sidecar (not yet written).

    Args:
        paths: ``(engine_path, output, onnx_out)``: the engine refitted, the one written, the swapped ONNX model.
        weights_tasks: ``(weights, tasks)`` from :func:`_new_weights`.
    """
    from hashlib import sha256

    from atexport.utils.io import atomic_write_bytes, sha256_file

    engine_path, output, onnx_out = paths
    weights, tasks = weights_tasks
    new = json.loads(json.dumps(sidecar))
    if meta.tasks:  # the bank now in the engine, for the next refit (TensorRT does not hand it back)
        from atexport.artifact.sidecar import bank_path

        buf = io.BytesIO()
        np.savez(buf, **weights)
        bank = atomic_write_bytes(bank_path(output), buf.getvalue())
        new["bank"] = {"path": bank.name, "sha256": sha256_file(bank)}
    atomic_write_bytes(output, data)
    new["engine"] = {"path": Path(output).name, "sha256": sha256(data).hexdigest(), "bytes": len(data)}
    previous_onnx = (sidecar.get("onnx") or {}).get("path")
    if onnx_out is not None:
        from atexport.artifact.onnx import read_onnx_model

        _, swapped_meta = read_onnx_model(onnx_out)
        new["metadata"] = asdict(swapped_meta)  # exactly what the rebuild source says: task, classes, tasks
        new["onnx"] = {"path": str(onnx_out.resolve()), "sha256": sha256_file(onnx_out), "refit_of": previous_onnx}
    else:
        md = new["metadata"]
        if meta.tasks:
            md["tasks"] = json.loads(json.dumps(tasks))
        else:
            md["task"] = task_name
            md["class_names"] = list(ckpt.model.class_names) if ckpt.model.class_names else md.get("class_names")
            md["num_classes"] = int(ckpt.model.num_classes)
        new["onnx"] = {"path": None, "sha256": None, "refit_of": previous_onnx}
    _record_refit(new, sidecar, engine_path, ckpt, task_name)
    return new


def _record_refit(new: dict, sidecar: dict, engine_path, ckpt, task_name: str) -> None:
    """What the engine now holds, in its new sidecar: where it came from, the task and its fingerprint."""
    from atexport.artifact.bank import task_fingerprint

    md = new["metadata"]
    md["extra"] = dict(md.get("extra") or {})
    md["extra"]["refit"] = {"from_engine": Path(engine_path).name, "from_task": sidecar["metadata"].get("task"),
                            "task": task_name, "fingerprint": task_fingerprint(ckpt.state_dict),
                            "checkpoint": Path(ckpt.path).name if ckpt.path else None}
    new["task"] = {"name": task_name, "fingerprint": md["extra"]["refit"]["fingerprint"]}
    new["parity"] = []


def _verify_refit(result: RefitResult, side: Path, meta, images, log) -> None:
    """The refitted engine against the swapped ONNX model in ONNX Runtime; kept as ``.failed`` when it fails."""
    from atexport.export.tensorrt.verify import keep_failed, verify_engine
    from atexport.utils.io import atomic_write_json

    new, output, onnx_out = result.sidecar, result.path, result.onnx_path
    prof = (new.get("profiles") or [{}])[0]
    rng = (int(prof["min"][0]), int(prof["max"][0])) if prof.get("min") else None
    new_meta = sidecar_metadata(new, f"engine {output}")
    t1 = time.perf_counter()
    result.parity = verify_engine(output, None, onnx_out, new_meta, meta.precision, images=images, log=log,
                                  batch_range=rng)
    result.seconds["verify"] = time.perf_counter() - t1
    new["parity"] = [r.to_dict() for r in result.parity]
    atomic_write_json(side, new)
    if not all(r.passed for r in result.parity):
        keep_failed(output, side, result.parity, f"the refitted {meta.precision} engine {output}")
