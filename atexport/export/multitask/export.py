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
from typing import Mapping, Sequence

import numpy as np

from atexport.artifact.bank import LAYOUT, PAD_LOGIT, TASK_AXIS, TASK_INPUT, bank_manifest, mixed_task_ids
from atexport.artifact.fit import check_same_family
from atexport.artifact.tasks import default_task_name
from atexport.errors import BadInputError, require
from atexport.export.multitask.edit import task_entry
from atexport.export.onnx import ExportResult, export_record


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
    *,
    task_names: Sequence[str] | None = None,
    max_classes: int | None = None,
    batch: int | None = None,
    opset: int | None = None,
    simplify: bool | None = None,
    simplifier: str | None = None,
    verify: bool = True,
    backbone_weights: str | Path | None = None,
    images=None,
    config: str | Mapping = "onnx",
    log=None,
) -> MultiTaskResult:
    """Export several checkpoints of one backbone as one multi-task ONNX model, verify it, write it atomically.

    Args:
        ckpts: checkpoint paths or loaded :class:`~atexport.checkpoint.Checkpoint` objects (one per task).
        output: model path; default ``tasks.onnx`` in the checkpoints' common folder.
        task_names: one name per checkpoint (default: :func:`~atexport.artifact.tasks.default_task_name`,
            the file stem, or the run folder's name for ``runs/cars/run.pt``).
        max_classes: width of the logits, i.e. the most classes any task (also one added later with
            :func:`~atexport.export.multitask.add_task`) may have; default: the largest class count among ``ckpts``.
        batch: fixed batch size; ``None`` takes the preset's (dynamic axis ``"batch"``).
        opset, simplify, simplifier, verify, backbone_weights, images, config, log: as in
            :func:`~atexport.export.onnx.export_onnx`.

    Returns:
        The :class:`MultiTaskResult`.

    Raises:
        BadInputError: no checkpoints, bad names or flags, unwritable output.
        IncompatibleCheckpointError: checkpoints that cannot share the model (backbone fingerprint, regime,
            rank, placement, alpha, preprocessing), each reason naming the file.
        ParityError: some task's logits differ from its own PyTorch model; the model is kept at
            ``<stem>.failed.onnx`` and nothing is written at ``output``.
    """
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.artifact.onnx import check_manifest
    from atexport.export.module import MIN_OPSET, bind_initializers, export_module, finish_proto
    from atexport.export.onnx import load_export_config, op_counts
    from atexport.export.multitask.modules import build_multitask_model
    from atexport.export.write import write_export
    from atexport.utils.io import check_writable

    say = log or (lambda *_: None)
    t_start = time.perf_counter()
    if isinstance(ckpts, (str, os.PathLike, Checkpoint)):
        ckpts = [ckpts]
    if not ckpts:
        raise BadInputError("give at least one checkpoint (--ckpt) for a multi-task model.")
    cfg = load_export_config(config, opset=opset, batch=batch, simplify=simplify, simplifier=simplifier)
    ex, par = cfg["export"], cfg["parity"]
    opset = int(ex.get("opset", MIN_OPSET))
    batch = ex.get("batch")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise BadInputError(f"--batch {batch}: must be a positive integer (omit it for a dynamic batch axis).")
    do_simplify = bool(ex.get("simplify", True))
    simplifier = str(ex.get("simplifier", "onnxslim"))

    ckpts = [(ck if isinstance(ck, Checkpoint) else load_checkpoint(ck)).for_export() for ck in ckpts]
    from atexport.adapters import check_export_mode  # the family says whether its layout fits the bank

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
    require("onnx", "exporting ONNX models", "onnx")
    require("onnxscript", "the PyTorch ONNX exporter (torch.onnx.export(dynamo=True))", "onnx")
    import torch

    say(f"building {ckpts[0].model.backbone} with a bank of {len(ckpts)} tasks ...")
    model, layout, bank = build_multitask_model(ckpts, max_classes, backbone_weights)
    in_shape = [int(v) for v in ckpts[0].preprocess["input_size"]]
    trace_batch = int(batch) if batch is not None else max(int(ex.get("trace_batch", 2)), 2)
    example = torch.randn((trace_batch, *in_shape), generator=torch.Generator().manual_seed(0))
    ids = torch.from_numpy(mixed_task_ids(trace_batch, len(ckpts)))
    manifest = bank_manifest(layout, len(ckpts))

    say(f"exporting (multi-task, {LAYOUT} layout, opset {opset}, "
        f"{'dynamic batch' if batch is None else f'batch {batch}'}) ...")
    t0 = time.perf_counter()
    proto = export_module(
        model, example, bank, extra_inputs={TASK_INPUT: ids},
        extra_dynamic={TASK_INPUT: {0: "batch"}} if batch is None else None,
        dynamic_batch=batch is None, opset=opset,
    )
    seconds = {"export": time.perf_counter() - t0}
    nodes = {"exported": len(proto.graph.node), "simplified": None}
    if do_simplify:
        from atexport.export.simplify import require_inputs
        from atexport.export.simplify import simplify as run_simplifier

        say(f"simplifying with {simplifier} ...")
        proto, stats = run_simplifier(proto, simplifier)
        require_inputs(proto, [*bank, TASK_INPUT])
        nodes["simplified"] = stats.nodes_after
        seconds["simplify"] = stats.seconds
    bind_initializers(proto, bank)
    check_manifest(proto, manifest, "exported multi-task model")
    _set_task_axis(proto, bank)
    extra = {
        "export": export_record(cfg, opset, batch, trace_batch, do_simplify, simplifier),
        "nodes": nodes,
        "ops": {k: v for k, v in op_counts(proto).items()
                if k in ("LayerNormalization", "Gelu", "Erf", "Gemm", "MatMul", "Gather")},
        "checkpoint": {"files": [Path(ck.path).name if ck.path else None for ck in ckpts]},
        "parity": None,
    }
    meta = _multitask_metadata(ckpts, names, batch=batch, manifest=manifest, max_classes=max_classes,
                               layout=layout, extra=extra)

    finish_proto(proto, meta, f"{ckpts[0].model.backbone} {ckpts[0].regime}, {len(ckpts)} tasks "
                 f"({', '.join(names[:8])}{'...' if len(names) > 8 else ''})", "the multi-task model")

    result = MultiTaskResult(path=None, metadata=meta, nodes=nodes, simplifier=simplifier if do_simplify else None)
    data = proto.SerializeToString()
    if verify:
        say("checking every task against its own PyTorch model, on mixed-task batches ...")
        t0 = time.perf_counter()
        result.parity = _verify_against_single_task(data, meta, ckpts, backbone_weights, images, par, in_shape, batch)
        seconds["verify"] = time.perf_counter() - t0
    write_export(proto, data, result, output,
                 "the multi-task model does not match the tasks' own PyTorch models within the "
                 f"{par.get('precision', 'fp32')} tolerances", verify=verify, seconds=seconds, t_start=t_start,
                 only_failed=True)
    return result


def _verify_against_single_task(data, meta, ckpts, backbone_weights, images, par, in_shape, batch):
    """Each task's rows of mixed-task batches against that task's own single-task PyTorch model."""
    from atexport.checkpoint import build_model
    from atexport.runtime.batching import run_batched
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.torch import TorchRunner
    from atexport.parity.compare import load_tolerances
    from atexport.parity import photo_batch, random_batch

    tol = load_tolerances(par.get("tolerances", "tolerances"))[par.get("precision", "fp32")]
    sets = [("photos", photo_batch(ckpts[0].preprocess, extra=images, max_images=par.get("max_images")))]
    if int(par.get("random_inputs", 8)):
        sets.append(("random", random_batch(int(par["random_inputs"]), in_shape, int(par.get("seed", 0)))))
    k = len(ckpts)
    sizes = [int(batch)] if batch is not None else [int(b) for b in par.get("batch_sizes", [1, 4])]
    # Mixed-task batches: the set is repeated and tasks assigned round-robin, shifted by one per copy,
    # so consecutive samples belong to different tasks. With few tasks every task sees every input
    # (K copies); with many, each task sees at least two.
    prepared = []
    for kind, x in sets:
        n = len(x)
        reps = k if k * n <= 64 else max(1, -(-2 * k // n))
        ids = np.concatenate([mixed_task_ids(n, k, offset=j) for j in range(reps)])
        prepared.append((kind, np.concatenate([x] * reps), ids))
    ref_model = build_model(ckpts[0], backbone_weights=backbone_weights)
    refs = {}
    with TorchRunner(ref_model) as ref:
        for i, ck in enumerate(ckpts):  # one backbone, each task's adapters and head loaded in turn
            ref_model.reset_classifier(int(ck.model.num_classes))
            ref_model.load_state_dict(ck.state_dict, strict=False)
            ref_model.eval()
            for kind, x, ids in prepared:
                refs[(i, kind)] = ref.infer(x[ids == i])
    rows = []
    with OnnxRuntimeRunner(data, optimization=par.get("optimization", "all")) as cand:
        for bs in sizes:
            for kind, x, ids in prepared:
                y = run_batched(cand, x, bs, per_sample={TASK_INPUT: ids})
                rows += _task_rows(meta, y, ids, refs, kind, bs, tol)
    return rows


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

