"""Swapping a task's adapters and head into a separable ONNX model file, and :func:`swap`, the library
entry point of ``atexport swap`` (an ONNX model is rewritten, an engine refitted).

A model exported with ``--separable`` keeps each adapter and head tensor as a graph input with an
initializer of the same name (an *overridable initializer*), listed in the metadata's manifest. Swapping
a task therefore needs no PyTorch tracing and no re-export:

* :func:`swap_onnx` rewrites those initializers in the file with another checkpoint's tensors
  (``atexport swap --onnx model.onnx --ckpt other.pt -o other.onnx``);
* :class:`atexport.runtime.session.AdapterSession` feeds them at run time to one live ONNX Runtime
  session, so switching task is changing a dict (no session rebuild).

Both are exact: ONNX Runtime does not constant-fold through overridable initializers at any
optimisation level. (``SessionOptions.add_initializer`` is *not* used: it gives silently wrong logits
when the replaced weight feeds a Transpose that ONNX Runtime constant-folds.)

:func:`atexport.artifact.fit.check_fits` refuses, with every reason, a checkpoint whose backbone
fingerprint, adapter settings, class count, preprocessing or tensors do not fit the model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.artifact.metadata import ModelMetadata


@dataclass
class SwapResult:
    """What :func:`swap_onnx` wrote.

    Attributes:
        path: the written model.
        metadata: its metadata (task, class names and swap provenance updated).
        swapped: number of tensors replaced.
        seconds: wall time of the swap (``swap``), of the optional parity check (``verify``), ``total``.
        parity: parity rows when ``verify=True``.
    """

    path: Path
    metadata: ModelMetadata
    swapped: int
    seconds: dict = field(default_factory=dict)
    parity: list = field(default_factory=list)


def _smoke_run(data: bytes, meta: ModelMetadata, where: str) -> None:
    """Load the model in ONNX Runtime and run one random batch: right output shape, finite logits."""
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    b = meta.input["shape"][0]
    b = b if isinstance(b, int) else 1
    x = np.random.default_rng(0).standard_normal((b, *meta.input["shape"][1:])).astype(np.float32)
    with OnnxRuntimeRunner(data) as r:
        y = r.infer(x)
    if y.shape != (b, meta.num_classes) or not np.isfinite(y).all():
        raise BadInputError(f"{where}: the swapped model gives {y.shape} logits (finite: {bool(np.isfinite(y).all())}).")


def swap_onnx(
    onnx_path: str | os.PathLike,
    ckpt,
    output: str | os.PathLike | None = None,
    *,
    task_name: str | None = None,
    verify: bool = False,
    backbone_weights: str | os.PathLike | None = None,
    images=None,
    config: str | Mapping = "onnx",
) -> SwapResult:
    """Write a copy of a separable model holding another checkpoint's adapters and head.

    No PyTorch tracing: the manifest's initializers are overwritten with the checkpoint's tensors, the
    metadata (task, class names) updated, the result loaded and run once in ONNX Runtime, then written
    atomically. The output may be the input file itself (it is replaced atomically).

    Args:
        onnx_path: a model exported with ``separable=True``.
        ckpt: the other task's checkpoint (path or :class:`~atexport.checkpoint.Checkpoint`).
        output: where to write; default ``<task name>.onnx`` beside ``onnx_path`` (``cars.onnx`` for
            ``runs/cars/run.pt``: a file beside another task's model is named by its task).
        task_name: the task's name in the metadata (default: the checkpoint's
            :func:`~atexport.artifact.tasks.default_task_name`, the run folder's name for ``runs/cars/run.pt``).
        verify: also rebuild the PyTorch model of ``ckpt`` and check parity (needs its backbone).
        backbone_weights: local backbone weights for ``verify``.
        images: extra parity images for ``verify``.
        config: export preset holding the parity settings.

    Raises:
        BadInputError: missing or corrupt files, unwritable output.
        IncompatibleCheckpointError: the checkpoint does not fit the model (every reason listed).
        ParityError: ``verify`` found a mismatch (nothing written).
    """
    from atexport.artifact.metadata import read_onnx_metadata, write_onnx_metadata
    from atexport.artifact.onnx import read_onnx
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.utils.io import atomic_write_bytes

    t0 = time.perf_counter()
    proto = read_onnx(onnx_path)
    meta = read_onnx_metadata(proto, str(onnx_path))
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    output = _swap_output(onnx_path, ckpt, output)
    replaced = _swap_tensors(proto, meta, ckpt, task_name, f"--onnx {onnx_path}")
    previous = meta.task
    meta.task = task_name or ckpt.name
    meta.class_names = list(ckpt.model.class_names) if ckpt.model.class_names else None
    meta.extra = dict(meta.extra or {})
    meta.extra["checkpoint"] = {"file": Path(ckpt.path).name if ckpt.path else None, "metrics": ckpt.metrics}
    meta.extra["swap"] = {"from_task": previous, "from_file": Path(onnx_path).name, "tensors": replaced}
    meta.extra["parity"] = None  # the export's parity numbers were for the previous task's weights
    write_onnx_metadata(proto, meta)
    data = proto.SerializeToString()
    _smoke_run(data, meta, f"--onnx {onnx_path} swapped to {ckpt.path}")
    seconds = {"swap": time.perf_counter() - t0}
    parity = []
    if verify:
        parity = _verify_swapped(data, meta, ckpt, backbone_weights, images, config)
        seconds["verify"] = time.perf_counter() - t0 - seconds["swap"]
        meta.extra["parity"] = [r.to_dict() for r in parity]
        write_onnx_metadata(proto, meta)
        data = proto.SerializeToString()
    atomic_write_bytes(output, data)
    seconds["total"] = time.perf_counter() - t0
    return SwapResult(path=output, metadata=meta, swapped=replaced, seconds=seconds, parity=parity)


def _swap_output(onnx_path, ckpt, output) -> Path:
    """The file a swap writes: ``output``, or ``<task name>.onnx`` beside the model (``cars.onnx`` for
    ``runs/cars/run.pt``); never the checkpoint itself."""
    from atexport.utils.io import check_writable

    if output is None:
        output = Path(onnx_path).with_name(f"{ckpt.name}.onnx")
    output = check_writable(output, "-o")
    if ckpt.path is not None and output.resolve() == Path(ckpt.path).resolve():
        raise BadInputError(f"-o {output}: that is the checkpoint itself; choose another output path.")
    return output


def _swap_tensors(proto, meta: ModelMetadata, ckpt, task_name, where: str) -> int:
    """Overwrite the manifest's initializers of ``proto`` with the checkpoint's tensors, once
    :func:`~atexport.artifact.fit.check_fits` has accepted them; returns how many were replaced."""
    from onnx import numpy_helper

    from atexport.artifact.fit import check_fits
    from atexport.artifact.onnx import check_manifest

    if meta.tasks:
        raise IncompatibleCheckpointError(
            f"{where} is a multi-task model (tasks: {', '.join(t['name'] for t in meta.tasks)}); change its tasks "
            "with 'atexport tasks add --model MODEL --ckpt CKPT [--name NAME --replace]' or 'atexport tasks remove'."
        )
    check_manifest(proto, meta.manifest, where)
    weights = check_fits(meta, ckpt.task_weights(task_name), where)
    replaced = 0
    for init in proto.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
            replaced += 1
    if replaced != len(weights):
        raise BadInputError(f"{where}: only {replaced} of {len(weights)} manifest initializers found in the graph.")
    return replaced


def _verify_swapped(data, meta, ckpt, backbone_weights, images, config):
    from atexport.checkpoint import build_model
    from atexport.export.onnx import load_export_config
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.torch import TorchRunner
    from atexport.parity import ParitySettings, check_parity, photo_batch, require_passed

    par = load_export_config(config)["parity"]
    model = build_model(ckpt, backbone_weights=backbone_weights)
    b = meta.input["shape"][0]
    sizes = [b] if isinstance(b, int) else [int(v) for v in par.get("batch_sizes", [1, 4])]
    photos = photo_batch(ckpt.preprocess, extra=images, max_images=par.get("max_images"))
    with TorchRunner(model) as ref, OnnxRuntimeRunner(data, optimization=par.get("optimization", "all")) as cand:
        results = check_parity(ref, cand, photos, par.get("precision", "fp32"), settings=ParitySettings(
            random_inputs=int(par.get("random_inputs", 8)), seed=int(par.get("seed", 0)), batch_sizes=sizes,
            tolerances=par.get("tolerances", "tolerances"),
        ))
    require_passed(results, "the swapped model")
    return results
