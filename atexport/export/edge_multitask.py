"""Multi-task on-device models: several checkpoints of one backbone in one ``.tflite`` / ``.pte`` with a
``task_id`` input.

The PyTorch multi-task model of :mod:`atexport.export.multitask` (the frozen backbone once, every task's
adapters and head stacked in banks indexed by ``task_id``, logits padded to the widest task) is converted
as it is, banks as constants, at batch 1: inputs ``(image, task_id)``, ``task_id`` an int64 of shape
``[1]``. Its metadata is the multi-task ONNX model's (``tasks``, ``extra.task_input``, ``extra.multitask``),
so :func:`atexport.runtime.load_model` serves it the same way (``predict(images, task="cars")``, one task
per image). Every task is checked against its own checkpoint's PyTorch model on real photos before the
artifact is written (:mod:`atexport.export.edge`). Adding or replacing a task means exporting again (the
banks are constants here, unlike the ONNX model's swappable banks).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from atexport.errors import BadInputError
from atexport.export.edge import EdgeOptions, EdgeResult

SUFFIXES = {"litert": ".tflite", "executorch": ".pte"}


def export_multitask_edge(ckpts: Sequence, output: str | os.PathLike, fmt: str, *, precision: str = "fp32",
                          task_names: Sequence[str] | None = None, max_classes: int | None = None, verify: bool = True,
                          options: EdgeOptions | None = None, log=None) -> EdgeResult:
    """Convert several checkpoints to one verified multi-task ``.tflite`` (``fmt="litert"``) or ``.pte``.

    Args:
        ckpts: checkpoint paths or loaded checkpoints, one per task, of one backbone and adapter layout.
        output: the artifact to write (``.tflite`` or ``.pte``).
        fmt: ``litert`` or ``executorch``.
        precision: ``fp32`` or ``int8`` (as for the single-task export of ``fmt``).
        task_names, max_classes: as in :func:`atexport.export.multitask.export_multitask`.
        verify, options, log: as in :func:`atexport.export.litert.export_litert` (``options.threads``: LiteRT only).

    Raises:
        BadInputError: no checkpoints, bad names, output with another suffix.
        IncompatibleCheckpointError: checkpoints that cannot share one model (every reason named).
        MissingDependencyError: the converter of ``fmt`` is not installed.
        ParityError: some task differs from its own PyTorch model; kept at ``<stem>.failed<suffix>``.
    """
    import torch

    from atexport.export.edge import write_edge
    from atexport.export.multitask.export import _multitask_metadata
    from atexport.export.multitask.modules import build_multitask_model
    from atexport.export.onnx import load_export_config

    say = log or (lambda *_: None)
    opts = options if options is not None else EdgeOptions()
    t_start = time.perf_counter()
    precision, ckpts, names, max_classes, out = _check_request(ckpts, output, fmt, precision, (task_names, max_classes))
    if fmt == "executorch":
        opts.refuse_threads("ExecuTorch")
    par = dict(load_export_config(opts.config)["parity"])
    say(f"building {ckpts[0].model.backbone} with a bank of {len(ckpts)} tasks ...")
    model, layout, _ = build_multitask_model(ckpts, max_classes, opts.backbone_weights)
    in_shape = [int(v) for v in ckpts[0].preprocess["input_size"]]
    example = (torch.randn((1, *in_shape), generator=torch.Generator().manual_seed(0)),
               torch.zeros(1, dtype=torch.int64))
    say(f"converting to {fmt} (multi-task, {len(ckpts)} tasks, {precision}) ...")
    t0 = time.perf_counter()
    data, record = _convert(fmt, model, example, precision)
    seconds = {"convert": time.perf_counter() - t0}
    extra = {fmt: record, "checkpoint": {"files": [Path(ck.path).name if ck.path else None for ck in ckpts]},
             "parity": None}
    meta = _multitask_metadata(ckpts, names, batch=1, manifest={}, max_classes=max_classes, layout=layout, extra=extra)
    meta.separable, meta.precision = False, precision  # banks are constants here
    meta.extra["task_input"]["shape"] = [1]
    result = EdgeResult(path=None, format=fmt, precision=precision, metadata=meta, seconds=seconds)
    if verify:
        t0 = time.perf_counter()
        result.parity = _check_tasks(_runner(fmt, data, meta, opts.threads), fmt, meta, ckpts, par, opts, say)
        seconds["verify"] = time.perf_counter() - t0
    write_edge(data, result, out, verify=verify, t_start=t_start)
    return result


def _check_request(ckpts: Sequence, output, fmt: str, precision: str, names_width):
    """Validate the request; returns the precision, the checkpoints (loaded, checked to share one model), the
    task names, the logits width and the output path."""
    from atexport.adapters import check_export_mode
    from atexport.artifact.fit import check_same_family
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.export.edge import refuse_precision
    from atexport.export.multitask.export import _names
    from atexport.utils.io import check_writable

    task_names, max_classes = names_width
    if fmt not in SUFFIXES:
        raise BadInputError(f"unknown on-device format {fmt!r}; expected litert or executorch.")
    precision = refuse_precision(precision, ("fp32", "int8"))
    if not ckpts:
        raise BadInputError("give at least one checkpoint (--ckpt) for a multi-task model.")
    ckpts = [(ck if isinstance(ck, Checkpoint) else load_checkpoint(ck)).for_export() for ck in ckpts]
    for ck in ckpts:
        check_export_mode(ck.adapter, "multitask", f"--ckpt {ck.path or 'checkpoint'}")
    check_same_family([ck.task_weights() for ck in ckpts])
    names = _names(ckpts, task_names)
    widest = max(int(ck.model.num_classes) for ck in ckpts)
    max_classes = widest if max_classes is None else int(max_classes)
    if max_classes < widest:
        raise BadInputError(f"--max-classes {max_classes}: must be >= the largest task's class count ({widest}).")
    out = check_writable(output, "-o")
    if out.suffix.lower() != SUFFIXES[fmt]:
        raise BadInputError(f"-o {out}: this artifact is a {SUFFIXES[fmt]} file; give a path ending in {SUFFIXES[fmt]}.")
    return precision, ckpts, names, max_classes, out


def _convert(fmt: str, model, example, precision: str) -> tuple[bytes, dict]:
    """The multi-task model converted to ``fmt`` (banks as constants), and its ``extra.<fmt>`` record."""
    if fmt == "litert":
        from atexport.export.litert import _convert, _versions, quantize_dynamic_range

        data = _convert(model, example)
        if precision == "int8":
            data = quantize_dynamic_range(data)
        record = {"signature": "serving_default", "image_input": "args_0", "task_input": "args_1",
                  "logits_output": "output_0", "weight_inputs": {}, "batch": 1, "versions": _versions(),
                  "quantization": "dynamic_wi8_afp32" if precision == "int8" else None}
        return data, record
    from atexport.export.executorch import _lower, _versions

    data = _lower(model, example, precision)
    record = {"method": "forward", "image_input": 0, "task_input": 1, "logits_output": 0, "delegate": "xnnpack",
              "weight_inputs": {}, "batch": 1, "versions": _versions(),
              "quantization": "xnnpack symmetric per-channel dynamic" if precision == "int8" else None}
    return data, record


def _check_tasks(runner, fmt: str, meta, ckpts, par: dict, opts: EdgeOptions, say) -> list:
    """Every task of the artifact (``runner``) against its own checkpoint's PyTorch model on real photos."""
    from atexport.checkpoint import build_model
    from atexport.parity import ParitySettings, check_parity, photo_batch
    from atexport.runtime.tasks import task_runners
    from atexport.runtime.torch import TorchRunner

    precision = meta.precision
    in_shape = [int(v) for v in ckpts[0].preprocess["input_size"]]
    photos = photo_batch(ckpts[0].preprocess, extra=opts.images, max_images=par.get("max_images"))
    say(f"checking every task against its own PyTorch model on {len(photos)} photos ...")
    rows = []
    with runner:
        for (task, cand), ck in zip(task_runners(meta, runner), ckpts):
            with TorchRunner(build_model(ck, backbone_weights=opts.backbone_weights)) as ref:
                rows += check_parity(
                    ref, cand, photos, precision, label=f"{fmt} {precision} {task['name']}",
                    settings=ParitySettings(random_inputs=int(par.get("random_inputs", 8)), seed=int(par.get("seed", 0)),
                                            batch_sizes=[1], tolerances=par.get("tolerances", "tolerances"),
                                            input_shape=in_shape))
    return rows


def _runner(fmt: str, data: bytes, meta, threads: int | None = None):
    if fmt == "litert":
        from atexport.runtime.litert import LiteRTRunner

        return LiteRTRunner(data, threads=threads, metadata=meta, name=f"litert-{meta.precision}")
    from atexport.runtime.executorch import ExecuTorchRunner

    return ExecuTorchRunner(data, metadata=meta, name=f"executorch-{meta.precision}")
