"""Exporting several checkpoints of one backbone as one multi-task ONNX model, verified task by task.

:func:`export_multitask` builds the PyTorch bank model (:mod:`atexport.export.multitask.modules`),
exports it with :func:`atexport.export.onnx.export_module` (bank tensors lifted to graph inputs with
initializers, the task axis made symbolic), writes the metadata (tasks, manifest, padding), and checks
every task's rows of mixed-task batches against that task's own single-task PyTorch model before
writing through :func:`atexport.export.write.write_export`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from atexport.artifact.bank import LAYOUT, PAD_LOGIT, TASK_AXIS, TASK_INPUT, bank_manifest, mixed_task_ids
from atexport.artifact.fit import check_same_family
from atexport.artifact.tasks import default_task_name
from atexport.errors import BadInputError
from atexport.export.multitask.edit import task_entry
from atexport.export.onnx import ExportResult
from atexport.export.settings import ExportSettings


@dataclass
class MultiTaskResult(ExportResult):
    """What :func:`export_multitask` produced: an :class:`~atexport.export.onnx.ExportResult` whose
    ``metadata.tasks`` lists the tasks and whose ``parity`` has one row per (task, input set, batch size),
    each task against its own PyTorch model.
    """

    def summary(self) -> str:
        """A few human-readable lines (the CLI prints them)."""
        m = self.metadata
        mt = m.extra["multitask"]
        shape = "x".join(str(v) for v in m.input["shape"])
        ad = m.adapter
        layout = ("head only" if not ad else ("" if ad.get("kind", "adaptertune") == "adaptertune" else f"{ad['kind']} ")
                  + ", ".join(f"{k} {ad[k]}" for k in ("rank", "every", "alpha", "lora_alpha", "experts") if k in ad))
        lines = [
            f"model:      {m.backbone['name']} ({m.regime}, {layout}), {len(m.tasks)} tasks, one backbone",
            f"inputs:     {m.input['name']} {shape} float32, {TASK_INPUT} [{m.input['shape'][0]}] int64 "
            "(index into the task list)",
            f"output:     {m.output['name']} {'x'.join(str(v) for v in m.output['shape'])} float32, "
            f"row i valid up to its task's class count, padded with {mt['pad_logit']:g}",
            "tasks:      " + ", ".join(f"{t['index']}:{t['name']} ({t['num_classes']})" for t in m.tasks),
            f"bank:       {len(m.manifest)} tensors, {mt['bytes_per_task'] / 1e6:.3f} MB per task "
            f"(capacity {mt['max_classes']} classes)",
        ]
        return "\n".join(lines + self.build_lines())


def _names(ckpts, task_names) -> list[str]:
    """One name per checkpoint: ``task_names``, or each checkpoint's :func:`default_task_name`."""
    if task_names:
        names = [str(n) for n in task_names]
        if len(names) != len(ckpts):
            raise BadInputError(
                f"{len(names)} task names for {len(ckpts)} checkpoints: give one --task-name per --ckpt, in order."
            )
    else:
        names = [default_task_name(ck) for ck in ckpts]
    if any(not n.strip() for n in names):
        raise BadInputError("task names must not be empty.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(
            f"task names {dup} are used twice (from the checkpoints' file or run folder names); "
            "give each checkpoint its own --task-name."
        )
    return names


def multitask_path_for(ckpts) -> Path:
    """``tasks.onnx`` in the checkpoints' common folder."""
    paths = [str(Path(ck.path).resolve().parent) for ck in ckpts if ck.path]
    if not paths:
        raise BadInputError("give an output path (-o): the checkpoints were not loaded from files.")
    return Path(os.path.commonpath(paths)) / "tasks.onnx"


def _set_task_axis(proto, names) -> None:
    """Make axis 0 of the bank inputs the symbolic ``tasks`` dimension (no node depends on it)."""
    wanted = set(names)
    for vi in proto.graph.input:
        if vi.name in wanted:
            d = vi.type.tensor_type.shape.dim[0]
            d.ClearField("dim_value")
            d.dim_param = TASK_AXIS


def _multitask_metadata(ckpts, names, *, batch, manifest, max_classes, layout, extra):
    from atexport.export.module import BATCH_AXIS
    from atexport.artifact.metadata import ModelMetadata

    first = ckpts[0]
    spec = first.model
    b = BATCH_AXIS if batch is None else int(batch)
    per_task = sum(int(np.prod(e["shape"])) for e in layout.values()) * 4
    extra = dict(extra)
    extra["task_input"] = {"name": TASK_INPUT, "dtype": "int64", "shape": [b],
                           "meaning": "per-sample index into metadata.tasks (tasks[i]['index'])"}
    extra["multitask"] = {
        "layout": LAYOUT,
        "tasks": len(ckpts),
        "max_classes": int(max_classes),
        "pad_logit": PAD_LOGIT,
        "task_axis": TASK_AXIS,
        "bytes_per_task": per_task,
        "slice_rows": "logits[i, :tasks[task_id[i]]['num_classes']]; the rest is pad_logit",
    }
    return ModelMetadata(
        backbone={"name": spec.backbone, "fingerprint": first.fingerprint, "model_args": dict(spec.model_args),
                  "source": dict(spec.source)},
        input={"name": "input", "shape": [b, *[int(v) for v in first.preprocess["input_size"]]], "dtype": "float32",
               "layout": "NCHW"},
        output={"name": "logits", "shape": [b, int(max_classes)], "dtype": "float32", "padded": True,
                "pad_value": PAD_LOGIT},
        preprocess=dict(first.preprocess),
        class_names=None,
        num_classes=None,
        adapter=first.adapter.to_dict() if first.adapter else None,
        regime=first.regime,
        separable=True,
        manifest=manifest,
        precision="fp32",
        task=None,
        tasks=[task_entry(ck, n, i) for i, (ck, n) in enumerate(zip(ckpts, names))],
        extra=extra,
    )


def export_multitask(
    ckpts: Sequence,
    output: str | Path | None = None,
    settings: ExportSettings | None = None,
    *,
    task_names: Sequence[str] | None = None,
    max_classes: int | None = None,
) -> MultiTaskResult:
    """Export several checkpoints of one backbone as one multi-task ONNX model, verify it, write it atomically.

    Example::

        from atexport.export import ExportSettings, export_multitask
        export_multitask(["runs/cars/run.pt", "runs/birds/run.pt"], "tasks.onnx", ExportSettings(batch=8))

    Args:
        ckpts: checkpoint paths or loaded :class:`~atexport.checkpoint.Checkpoint` objects (one per task).
        output: model path; default ``tasks.onnx`` in the checkpoints' common folder.
        settings: the :class:`~atexport.export.settings.ExportSettings`, as for
            :func:`~atexport.export.onnx.export_onnx` (``separable`` does not matter: the bank is always
            swappable); default ``ExportSettings()``.
        task_names: one name per checkpoint (default: :func:`~atexport.artifact.tasks.default_task_name`,
            the file stem, or the run folder's name for ``runs/cars/run.pt``).
        max_classes: width of the logits, i.e. the most classes any task (also one added later with
            :func:`~atexport.export.multitask.add_task`) may have; default: the largest class count among ``ckpts``.

    Returns:
        The :class:`MultiTaskResult`.

    Raises:
        BadInputError: no checkpoints, bad names or flags, unwritable output.
        IncompatibleCheckpointError: checkpoints that cannot share the model (backbone fingerprint, regime,
            rank, placement, alpha, preprocessing), each reason naming the file.
        ParityError: some task's logits differ from its own PyTorch model; the model is kept at
            ``<stem>.failed.onnx`` and nothing is written at ``output``.
    """
    from atexport.artifact.onnx import check_manifest
    from atexport.export.module import finish_proto
    from atexport.export.multitask.modules import build_multitask_model
    from atexport.export.onnx import export_extra, require_exporter, trace_model
    from atexport.export.write import write_export

    s = settings if settings is not None else ExportSettings()
    t_start = time.perf_counter()
    ckpts, names, max_classes, output = _open_checkpoints(ckpts, output, task_names, max_classes)
    images = s.load_images()
    require_exporter()
    import torch

    s.say(f"building {ckpts[0].model.backbone} with a bank of {len(ckpts)} tasks ...")
    model, layout, bank = build_multitask_model(ckpts, max_classes, s.backbone_weights)
    in_shape = [int(v) for v in ckpts[0].preprocess["input_size"]]
    ids = torch.from_numpy(mixed_task_ids(s.trace_batch, len(ckpts)))
    manifest = bank_manifest(layout, len(ckpts))
    proto, nodes, seconds = trace_model(model, in_shape, bank, s, f"multi-task, {LAYOUT} layout",
                                        extra_inputs={TASK_INPUT: ids})
    check_manifest(proto, manifest, "exported multi-task model")
    _set_task_axis(proto, bank)
    extra = export_extra(proto, s, nodes, ("LayerNormalization", "Gelu", "Erf", "Gemm", "MatMul", "Gather"),
                         {"files": [Path(ck.path).name if ck.path else None for ck in ckpts]})
    meta = _multitask_metadata(ckpts, names, batch=s.batch, manifest=manifest, max_classes=max_classes,
                               layout=layout, extra=extra)
    finish_proto(proto, meta, f"{ckpts[0].model.backbone} {ckpts[0].regime}, {len(ckpts)} tasks "
                 f"({', '.join(names[:8])}{'...' if len(names) > 8 else ''})", "the multi-task model")
    result = MultiTaskResult(path=None, metadata=meta, nodes=nodes, simplifier=s.simplifier if s.simplify else None)
    data = proto.SerializeToString()
    if s.verify:
        s.say("checking every task against its own PyTorch model, on mixed-task batches ...")
        t0 = time.perf_counter()
        result.parity = _verify_against_single_task(data, meta, ckpts, s, images, in_shape)
        seconds["verify"] = time.perf_counter() - t0
    write_export(proto, data, result, output,
                 "the multi-task model does not match the tasks' own PyTorch models within the "
                 f"{s.precision} tolerances", verify=s.verify, seconds=seconds, t_start=t_start,
                 only_failed=True)
    return result


def _open_checkpoints(ckpts, output, task_names, max_classes):
    """``(checkpoints in their export layout, task names, logits width, output path)``, every refusal (a family
    without a bank, checkpoints that cannot share one model, bad names or width, bad output) before any model
    is built."""
    from atexport.adapters import check_export_mode  # the family says whether its layout fits the bank
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.utils.io import check_writable

    if isinstance(ckpts, (str, os.PathLike, Checkpoint)):
        ckpts = [ckpts]
    if not ckpts:
        raise BadInputError("give at least one checkpoint (--ckpt) for a multi-task model.")
    ckpts = [(ck if isinstance(ck, Checkpoint) else load_checkpoint(ck)).for_export() for ck in ckpts]
    for ck in ckpts:
        check_export_mode(ck.adapter, "multitask", f"--multitask {ck.path or 'checkpoint'}")
    check_same_family([ck.task_weights() for ck in ckpts])
    names = _names(ckpts, task_names)
    widest = max(int(ck.model.num_classes) for ck in ckpts)
    if max_classes is None:
        max_classes = widest
    elif isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < widest:
        raise BadInputError(
            f"--max-classes {max_classes}: must be an integer >= the largest task's class count ({widest})."
        )
    output = check_writable(output if output is not None else multitask_path_for(ckpts), "-o")
    for ck in ckpts:
        if ck.path is not None and output.resolve() == Path(ck.path).resolve():
            raise BadInputError(f"-o {output}: that is a checkpoint; choose another output path.")
    return ckpts, names, max_classes, output


def _verify_against_single_task(data, meta, ckpts, settings: ExportSettings, images, in_shape):
    """Each task's rows of mixed-task batches against that task's own single-task PyTorch model."""
    from atexport.parity import photo_batch, random_batch
    from atexport.parity.compare import load_tolerances
    from atexport.runtime.batching import run_batched
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    par = settings.parity
    tol = load_tolerances(par.get("tolerances", "tolerances"))[settings.precision]
    sets = [("photos", photo_batch(ckpts[0].preprocess, extra=images, max_images=par.get("max_images")))]
    if int(par.get("random_inputs", 8)):
        sets.append(("random", random_batch(int(par["random_inputs"]), in_shape, int(par.get("seed", 0)))))
    k = len(ckpts)
    # Mixed-task batches: the set is repeated and tasks assigned round-robin, shifted by one per copy,
    # so consecutive samples belong to different tasks. With few tasks every task sees every input
    # (K copies); with many, each task sees at least two.
    prepared = []
    for kind, x in sets:
        n = len(x)
        reps = k if k * n <= 64 else max(1, -(-2 * k // n))
        ids = np.concatenate([mixed_task_ids(n, k, offset=j) for j in range(reps)])
        prepared.append((kind, np.concatenate([x] * reps), ids))
    refs = _single_task_logits(ckpts, settings.backbone_weights, prepared)
    rows = []
    with OnnxRuntimeRunner(data, optimization=par.get("optimization", "all")) as cand:
        for bs in settings.batch_sizes:
            for kind, x, ids in prepared:
                y = run_batched(cand, x, bs, per_sample={TASK_INPUT: ids})
                rows += _task_rows(meta, y, ids, refs, kind, bs, tol)
    return rows


def _single_task_logits(ckpts, backbone_weights, prepared) -> dict:
    """``{(task index, input set): logits}`` of each task's own PyTorch model on its rows of ``prepared``."""
    from atexport.checkpoint import build_model
    from atexport.runtime.torch import TorchRunner

    ref_model = build_model(ckpts[0], backbone_weights=backbone_weights)
    refs = {}
    with TorchRunner(ref_model) as ref:
        for i, ck in enumerate(ckpts):  # one backbone, each task's adapters and head loaded in turn
            ref_model.reset_classifier(int(ck.model.num_classes))
            ref_model.load_state_dict(ck.state_dict, strict=False)
            ref_model.eval()
            for kind, x, ids in prepared:
                refs[(i, kind)] = ref.infer(x[ids == i])
    return refs


def _task_rows(meta, y, ids, refs, kind, bs, tol):
    from atexport.parity.compare import compare

    out = []
    for t in meta.tasks:
        i, c = t["index"], t["num_classes"]
        rows = y[ids == i]
        r = compare(refs[(i, kind)], rows[:, :c], tol, name=f"{t['name']} {kind} (batch {bs})")
        if rows.shape[1] > c and not np.all(rows[:, c:] == np.float32(PAD_LOGIT)):
            r.failures.append(f"padded logits are not {PAD_LOGIT:g}")
        out.append(r)
    return out

