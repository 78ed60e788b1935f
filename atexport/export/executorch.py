"""Writing a verified ExecuTorch program (``.pte``, XNNPACK delegate) from an atexport checkpoint, for
Android and iOS apps.

``atexport executorch --ckpt run.pt [--separable] [--precision fp32|int8]`` rebuilds the trained model,
exports it with ``torch.export``, lowers it with ``to_edge_transform_and_lower`` and the XNNPACK
partitioner, runs the program in ExecuTorch's runtime
(:class:`~atexport.runtime.executorch.ExecuTorchRunner`) against PyTorch on real photos, and writes it only
when every parity row passes (:mod:`atexport.export.edge`):

* ``fp32``: float rounding (the ``fp32`` row of ``export_configs/tolerances.yaml``);
* ``int8``: the XNNPACK quantizer's symmetric per-channel *dynamic* config (weights INT8, activations
  quantized per call; ``torchao`` PT2E ``prepare_pt2e``/``convert_pt2e``), held to the ``int8`` row. No
  calibration set is needed. In a separable program the task's tensors are inputs and stay float;
* ``int8-static``: the same quantizer's *static* per-channel config (activation ranges measured on an
  atexport calibration set, ``--calib``, through the model's own preprocessing), held to the ``int8`` row.

Separable programs take the task's tensors as method inputs after the image (their positions are the
metadata's ``extra.executorch.weight_inputs``), rather than ExecuTorch's named-data ``.ptd`` files,
whose keys are content hashes that merge identical tensors (zero-initialised adapters collapse to fewer
keys, issue #21); inputs are never merged. Beside ``model.pte`` go ``model.pte.json`` (metadata) and, when
separable, ``model.pte.task.npz`` (the exported task).
"""

from __future__ import annotations

import os
import time

from atexport.errors import require
from atexport.export.edge import EdgeOptions, EdgeResult

PRECISIONS = ("fp32", "int8", "int8-static")


def _lower(module, example, precision: str, calib_batch=None) -> bytes:
    """``torch.export`` -> (INT8: XNNPACK quantizer, per-channel, dynamic or static with ``calib_batch``) ->
    XNNPACK-lowered ``.pte`` bytes."""
    import torch

    require("executorch", "exporting ExecuTorch programs", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = tuple(example)
    if precision in ("int8", "int8-static"):
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        dynamic = precision == "int8"
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                   is_dynamic=dynamic))
        prepared = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
        if dynamic or calib_batch is None:
            prepared(*example)
        else:  # static: observe the calibration images one by one (the program's batch is 1)
            for i in range(len(calib_batch)):
                prepared(torch.from_numpy(calib_batch[i: i + 1]), *example[1:])
        module = convert_pt2e(prepared)
    program = torch.export.export(module, example)
    return bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("executorch", "torch", "torchao"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def export_executorch(ckpt, output: str | os.PathLike | None = None, *, separable: bool = False,
                      precision: str = "fp32", calib=None, calib_count: int | None = None, verify: bool = True,
                      task_name: str | None = None, options: EdgeOptions | None = None, log=None) -> EdgeResult:
    """Convert a checkpoint to a verified ExecuTorch ``.pte`` (XNNPACK, batch 1), written atomically with its sidecar.

    Args:
        ckpt: a ``run.pt`` path or a loaded :class:`~atexport.checkpoint.Checkpoint`.
        output: the ``.pte`` to write; default ``<checkpoint stem>.pte`` beside the checkpoint.
        separable: adapter and head tensors as method inputs (swappable tasks, see the module docstring).
        precision: ``fp32``, ``int8`` (XNNPACK quantizer, dynamic per-channel) or ``int8-static`` (static
            per-channel, calibrated on ``calib``).
        calib: ``int8-static`` only: the calibration set (a name in ``calibration/``, a YAML path or a
            folder of images; default ``digits``).
        calib_count: how many calibration images (default: the set's).
        verify: check parity against PyTorch before writing (on by default).
        task_name: the task's name in the metadata (default: the checkpoint's).
        options: :class:`~atexport.export.edge.EdgeOptions`: extra parity ``images``, local
            ``backbone_weights``, the export preset ``config`` holding the parity settings (``threads`` is
            LiteRT's and refused here).
        log: optional callable receiving progress lines.

    Raises:
        BadInputError: unreadable checkpoint, unknown precision, output not a ``.pte``.
        IncompatibleCheckpointError: fingerprint mismatch, ``separable`` with a full fine-tune.
        MissingDependencyError: executorch is not installed (``pip install 'atexport[executorch]'``).
        ParityError: outside the tolerance; kept at ``<stem>.failed.pte`` (with its sidecar), nothing at ``output``.
    """
    from atexport.export.edge import (check_runner, edge_metadata, module_to_convert, own_task_bytes, prepare,
                                      refuse_precision, write_edge)
    from atexport.runtime.executorch import ExecuTorchRunner

    say = log or (lambda *_: None)
    opts = options if options is not None else EdgeOptions()
    t_start = time.perf_counter()
    precision = refuse_precision(precision, PRECISIONS)
    if precision != "int8-static" and (calib is not None or calib_count is not None):
        from atexport.errors import BadInputError

        raise BadInputError(f"--calib applies to --precision int8-static (static activation ranges); {precision} "
                            "needs no calibration set.")
    opts.refuse_threads("ExecuTorch")
    require("executorch", "exporting ExecuTorch programs", "executorch")
    em = prepare(ckpt, output, ".pte", separable=separable, images=opts.images, task_name=task_name,
                 backbone_weights=opts.backbone_weights, config=opts.config)
    say(f"lowering {em.ckpt.model.backbone} to ExecuTorch + XNNPACK ({'separable' if em.names else 'fused'}, "
        f"{precision}) ...")
    t0 = time.perf_counter()
    calib_batch, calib_desc, held_out, held_name = None, None, None, None
    if precision == "int8-static":
        from atexport.export.precision.calibration import load_calibration_set

        cs = load_calibration_set(calib or "digits", count=calib_count)
        say(f"loading calibration images ({cs.name}: {cs.source}, up to {cs.count}) ...")
        calib_batch, calib_desc = cs.batch(em.ckpt.preprocess), cs.to_dict()
        held_out, held_name = cs.batch(em.ckpt.preprocess, "holdout"), f"held-out {cs.name}"
    data = _lower(module_to_convert(em), em.example, precision, calib_batch)
    seconds = {"convert": time.perf_counter() - t0}
    row = "int8" if precision.startswith("int8") else precision  # metadata precision and tolerance row
    meta = edge_metadata(em, "executorch", row, _record(em, precision, calib_desc))
    result = EdgeResult(path=None, format="executorch", precision=precision, metadata=meta, seconds=seconds)
    if verify:
        t0 = time.perf_counter()
        runner = ExecuTorchRunner(data, metadata=meta, name=f"executorch-{precision}")
        result.parity = check_runner(em, runner, row, f"executorch {precision}", say, judged=held_out,
                                     judged_name=held_name or "held-out")
        seconds["verify"] = time.perf_counter() - t0
    write_edge(data, result, em.output, verify=verify, t_start=t_start, extra_files=own_task_bytes(em))
    return result


def _record(em, precision: str, calib_desc) -> dict:
    """``extra.executorch`` of the metadata: the method, its inputs and output, the quantization, the versions."""
    return {"method": "forward", "image_input": 0, "logits_output": 0, "delegate": "xnnpack",
            "weight_inputs": {n: i + 1 for i, n in enumerate(em.names)},
            "quantization": {"int8": "xnnpack symmetric per-channel dynamic",
                             "int8-static": "xnnpack symmetric per-channel static"}.get(precision),
            "calibration": calib_desc,
            "batch": 1, "versions": _versions()}
