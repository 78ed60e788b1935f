"""Export a checkpoint to a verified ONNX model, fused or with separable (swappable) task weights.

:func:`export_onnx` rebuilds the trained PyTorch model from a checkpoint and its backbone (refusing a
backbone whose fingerprint differs), exports it, checks it with ``onnx.checker`` (full check), optionally
simplifies it, writes the metadata an app needs (``atexport.metadata``), checks parity against PyTorch on
real photos and seeded random inputs, and only then writes the file, atomically. A model that fails
parity is kept under ``<stem>.failed.onnx`` and a :class:`~atexport.errors.ParityError` is raised.

The exporter is pinned: ``torch.onnx.export(..., dynamo=True)`` (PyTorch changed the default in 2.9) at
opset >= 20, which keeps LayerNorm as one ``LayerNormalization`` node and GELU as one ``Gelu`` node (a
decomposed LayerNorm overflows in FP16 on ViTs). The deprecated TorchScript exporter splits GELU into
``Erf`` arithmetic and merges parameters with identical values, so zero-initialised adapter
up-projections collapse into one shared tensor (tested in ``tests/test_export_onnx.py``).

Separable export (``separable=True``): the adapter and head tensors are *lifted*. The model is exported
through a wrapper that takes them as an explicit dict input and calls ``torch.func.functional_call``,
so they become graph inputs named exactly like the checkpoint's tensors (``blocks.3.adapter.down.weight``,
``head.weight``). Graph inputs are left alone by the exporter's optimizer (which otherwise deduplicates
equal-valued tensors and folds weight transposes into new, unnamed constants) and by the simplifiers.
After simplification each lifted input gets an initializer of the same name holding the task's values:
an *overridable initializer*, so the model runs on its own (``session.get_inputs()`` lists only
``input``), ONNX Runtime does not constant-fold through it at any optimisation level, and feeding the
name at run time or rewriting the initializer in the file swaps the task exactly
(:mod:`atexport.export.swap`). The exporter itself is :mod:`atexport.export.module`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from atexport.artifact.onnx import check_manifest
from atexport.errors import BadInputError, IncompatibleCheckpointError, require
from atexport.export.module import BATCH_AXIS, MIN_OPSET, bind_initializers, export_module, finish_proto
from atexport.export.settings import ExportSettings, load_export_config

__all__ = [
    "BATCH_AXIS", "MIN_OPSET", "ExportResult", "ExportSettings", "bind_initializers", "build_manifest",
    "check_separable", "export_module", "export_onnx", "failed_path_for", "load_export_config", "onnx_path_for",
    "op_counts", "swappable_names",
]


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced.

    Attributes:
        path: where the model was written (``None`` if it was not, i.e. parity failed).
        metadata: the metadata written into the model.
        parity: one row per (input set, batch size); empty when verification was skipped.
        nodes: ``{"exported": n, "simplified": m}`` (``simplified`` is ``None`` without simplification).
        simplifier: the tool used, or ``None``.
        seconds: wall time of each step (``export``, ``simplify``, ``verify``, ``total``).
        size_bytes: size of the serialized model.
        failed_path: where a model that failed parity was kept.
    """

    path: Path | None
    metadata: Any
    parity: list = field(default_factory=list)
    nodes: dict = field(default_factory=dict)
    simplifier: str | None = None
    seconds: dict = field(default_factory=dict)
    size_bytes: int = 0
    failed_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.parity)

    @property
    def verified(self) -> bool:
        return bool(self.parity)

    def summary(self) -> str:
        """A few human-readable lines (the CLI prints them)."""
        m = self.metadata
        shape = "x".join(str(v) for v in m.input["shape"])
        lines = [
            f"model:      {m.backbone['name']} ({m.regime}, {m.num_classes} classes), task {m.task!r}",
            f"input:      {m.input['name']} {shape} float32; output {m.output['name']} "
            f"{'x'.join(str(v) for v in m.output['shape'])}",
            f"separable:  {'yes, ' + str(len(m.manifest)) + ' swappable tensors' if m.separable else 'no (weights fused)'}",
        ]
        return "\n".join(lines + self.build_lines())

    def build_lines(self) -> list[str]:
        """The summary's closing lines: node counts, size, timings."""
        if self.nodes.get("simplified") is not None:
            nodes = f"nodes:      {self.nodes['exported']} exported -> {self.nodes['simplified']} after {self.simplifier}"
        else:
            nodes = f"nodes:      {self.nodes.get('exported')} (not simplified)"
        return [nodes, f"size:       {self.size_bytes / 1e6:.2f} MB",
                "time:       " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())]


# --------------------------------------------------------------------------------------------------
# Reusable pieces: pinned exporter, lifted parameters, overridable initializers, manifest
# --------------------------------------------------------------------------------------------------


def build_manifest(tensors: Mapping[str, Any]) -> dict:
    """The swappable-tensor manifest: checkpoint name -> initializer name, shape, dtype, role (and block)."""
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        entry = {
            "initializer": name,
            "shape": [int(v) for v in t.shape],
            "dtype": str(t.dtype).replace("torch.", ""),
            "role": "adapter" if ".adapter." in name else ("head" if name.startswith("head.") else "other"),
        }
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            entry["block"] = int(parts[1])
        out[name] = entry
    return out


def op_counts(model) -> dict[str, int]:
    """Node count per op type of the main graph."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


# --------------------------------------------------------------------------------------------------
# The export stage
# --------------------------------------------------------------------------------------------------


def onnx_path_for(ckpt_path: str | Path) -> Path:
    """``<checkpoint folder>/<checkpoint stem>.onnx``."""
    p = Path(ckpt_path)
    return p.with_name(p.stem + ".onnx")


def failed_path_for(output: str | Path) -> Path:
    """Where a model that failed parity is kept: ``<stem>.failed.onnx`` beside ``output``."""
    from atexport.artifact.onnx import failed_path_for as _failed_path_for

    return Path(_failed_path_for(output))


def check_separable(ckpt) -> None:
    """Refuse ``--separable`` for a checkpoint that has no task to separate from its backbone (a ``full``
    fine-tune) or whose adapter family's export layout cannot be separable; needs no model, so it runs
    before one is built."""
    if ckpt.regime == "full":
        raise IncompatibleCheckpointError(
            "--separable needs an adapter or head checkpoint; a 'full' fine-tune changes the whole backbone, "
            "so there is no shared backbone to separate. Export it without --separable."
        )
    from atexport.adapters import check_export_mode

    check_export_mode(ckpt.adapter, "separable", f"--separable {ckpt.path or 'checkpoint'}")


def swappable_names(ckpt, model) -> list[str]:
    """The tensors a separable export lifts: the checkpoint's adapter and head tensors, model order."""
    check_separable(ckpt)
    params = dict(model.named_parameters())
    names = [n for n in params if n in ckpt.state_dict]
    extra = sorted(set(ckpt.state_dict) - set(params))
    if extra:
        raise IncompatibleCheckpointError(f"checkpoint tensors {extra[:5]} are not parameters of the rebuilt model.")
    if not names:
        raise IncompatibleCheckpointError("the checkpoint holds no adapter or head tensors to make swappable.")
    return names


def _metadata(ckpt, *, input_name, output_name, batch, separable, manifest, task, extra):
    from atexport.artifact.metadata import ModelMetadata

    spec = ckpt.model
    b = BATCH_AXIS if batch is None else int(batch)
    return ModelMetadata(
        backbone={
            "name": spec.backbone,
            "fingerprint": ckpt.fingerprint,
            "model_args": dict(spec.model_args),
            "source": dict(spec.source),
        },
        input={
            "name": input_name,
            "shape": [b, *[int(v) for v in ckpt.preprocess["input_size"]]],
            "dtype": "float32",
            "layout": "NCHW",
        },
        output={"name": output_name, "shape": [b, int(spec.num_classes)], "dtype": "float32"},
        preprocess=dict(ckpt.preprocess),
        class_names=list(spec.class_names) if spec.class_names else None,
        num_classes=int(spec.num_classes),
        adapter=ckpt.adapter.to_dict() if ckpt.adapter else None,
        regime=ckpt.regime,
        separable=bool(separable),
        manifest=manifest,
        precision="fp32",
        task=task,
        extra=extra,
    )




# --------------------------------------------------------------------------------------------------
# Steps shared with the multi-task export (atexport.export.multitask.export)
# --------------------------------------------------------------------------------------------------


def require_exporter() -> None:
    """Refuse, with the pip extra to install, a machine without the ONNX exporter's libraries."""
    require("onnx", "exporting ONNX models", "onnx")
    require("onnxscript", "the PyTorch ONNX exporter (torch.onnx.export(dynamo=True))", "onnx")


def trace_model(model, in_shape, lifted: Mapping[str, Any], settings: ExportSettings, what: str,
                extra_inputs: Mapping[str, Any] | None = None):
    """Export ``model`` with the pinned exporter, simplify it (as ``settings`` say) and give the lifted
    tensors their values (overridable initializers).

    Args:
        model: the eval-mode PyTorch model.
        in_shape: the image input's ``[C, H, W]``.
        lifted: ``{name: tensor}`` lifted to graph inputs (the separable tensors, a multi-task bank).
        settings: the export settings (opset, batch, simplifier, log).
        what: how the progress line names the export (``"separable"``, ``"fused"``, ...).
        extra_inputs: further batch-aligned inputs (``task_id``).

    Returns:
        ``(proto, nodes, seconds)``: the model, ``{"exported": n, "simplified": m or None}`` and the
        ``export`` (and ``simplify``) timings.
    """
    import torch

    s = settings
    example = torch.randn((s.trace_batch, *in_shape), generator=torch.Generator().manual_seed(0))
    s.say(f"exporting ({what}, opset {s.opset}, {s.describe_batch()}) ...")
    t0 = time.perf_counter()
    dynamic = {n: {0: BATCH_AXIS} for n in extra_inputs} if extra_inputs and s.batch is None else None
    proto = export_module(model, example, lifted, extra_inputs=extra_inputs, extra_dynamic=dynamic,
                          dynamic_batch=s.batch is None, opset=s.opset)
    seconds = {"export": time.perf_counter() - t0}
    nodes = {"exported": len(proto.graph.node), "simplified": None}
    if s.simplify:
        from atexport.export.simplify import require_inputs
        from atexport.export.simplify import simplify as run_simplifier

        s.say(f"simplifying with {s.simplifier} ...")
        proto, stats = run_simplifier(proto, s.simplifier)
        require_inputs(proto, [*lifted, *(extra_inputs or {})])
        nodes["simplified"] = stats.nodes_after
        seconds["simplify"] = stats.seconds
    if lifted:
        bind_initializers(proto, lifted)
    return proto, nodes, seconds


def export_extra(proto, settings: ExportSettings, nodes: dict, ops: tuple, checkpoint: dict) -> dict:
    """The ``extra`` section of an exported model's metadata: how it was made, its node and op counts, the
    checkpoint(s) it came from; ``parity`` is filled once verified."""
    return {
        "export": settings.record(),
        "nodes": nodes,
        "ops": {k: v for k, v in op_counts(proto).items() if k in ops},
        "checkpoint": checkpoint,
        "parity": None,
    }


# --------------------------------------------------------------------------------------------------
# The export stage
# --------------------------------------------------------------------------------------------------


def export_onnx(ckpt, output: str | Path | None = None, settings: ExportSettings | None = None, *,
                task_name: str | None = None) -> ExportResult:
    """Export a checkpoint to ONNX, verify it against PyTorch, and write it atomically.

    Example::

        from atexport.export import ExportSettings, export_onnx
        result = export_onnx("runs/cars/run.pt", settings=ExportSettings(separable=True))  # runs/cars/run.onnx

    Args:
        ckpt: path of a ``run.pt`` or a loaded :class:`~atexport.checkpoint.Checkpoint`.
        output: model path; default :func:`onnx_path_for` (``runs/cars/run.pt`` -> ``runs/cars/run.onnx``).
        settings: the :class:`~atexport.export.settings.ExportSettings` (separable, batch, opset, simplifier,
            verify, backbone weights, extra parity photos, preset, log); default ``ExportSettings()``.
        task_name: the task's name in the metadata (default: the checkpoint's
            :func:`~atexport.artifact.tasks.default_task_name`, the run folder's name for ``runs/cars/run.pt``).

    Returns:
        The :class:`ExportResult`.

    Raises:
        BadInputError: missing/unreadable checkpoint, bad flags, unwritable output.
        IncompatibleCheckpointError: the backbone's fingerprint differs, or ``separable`` with a full fine-tune.
        ParityError: the model does not compute what PyTorch computes; it is kept at ``<stem>.failed.onnx``
            (``error.result`` holds the :class:`ExportResult`) and nothing is written at ``output``.
    """
    from atexport.checkpoint import build_model
    from atexport.export.write import write_export

    s = settings if settings is not None else ExportSettings()
    t_start = time.perf_counter()
    ckpt, output = _open_checkpoint(ckpt, output, s)
    task = task_name or ckpt.name
    images = s.load_images()
    require_exporter()
    _refuse_non_finite(ckpt)
    s.say(f"building {ckpt.model.backbone} from {ckpt.path or 'checkpoint'} ...")
    model = build_model(ckpt, backbone_weights=s.backbone_weights)
    in_shape = [int(v) for v in ckpt.preprocess["input_size"]]
    lifted, manifest = {}, {}
    if s.separable:
        params = dict(model.named_parameters())
        lifted = {n: params[n].detach().clone() for n in swappable_names(ckpt, model)}
        manifest = build_manifest(lifted)  # before simplifying: names are the checkpoint's, by construction
    proto, nodes, seconds = trace_model(model, in_shape, lifted, s, "separable" if s.separable else "fused")
    if lifted:
        check_manifest(proto, manifest, "exported model")
    extra = export_extra(proto, s, nodes, ("LayerNormalization", "Gelu", "Erf", "Gemm", "MatMul"),
                         {"file": Path(ckpt.path).name if ckpt.path else None, "metrics": ckpt.metrics})
    meta = _metadata(ckpt, input_name="input", output_name="logits", batch=s.batch, separable=s.separable,
                     manifest=manifest, task=task, extra=extra)
    finish_proto(proto, meta, f"{ckpt.model.backbone} {ckpt.regime} task {task!r}", "the exported model")
    result = ExportResult(path=None, metadata=meta, nodes=nodes, simplifier=s.simplifier if s.simplify else None)
    data = proto.SerializeToString()
    if s.verify:
        s.say("checking parity against PyTorch ...")
        t0 = time.perf_counter()
        result.parity = _check_against_torch(model, data, ckpt.preprocess, in_shape, s, images)
        seconds["verify"] = time.perf_counter() - t0
    write_export(proto, data, result, output,
                 f"the exported model does not match PyTorch within the {s.precision} tolerances",
                 verify=s.verify, seconds=seconds, t_start=t_start, failed_path=failed_path_for(output))
    return result


def _open_checkpoint(ckpt, output, settings: ExportSettings):
    """``(checkpoint in its export layout, output path)``, refusing an output that cannot be written or is the
    checkpoint itself, and ``--separable`` where it does not apply (before any model is built)."""
    from atexport.checkpoint import Checkpoint, load_checkpoint
    from atexport.utils.io import check_writable

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    ckpt = ckpt.for_export()  # the adapter family's export layout (AdaRing: materialised AdapterTune tensors)
    if output is None:
        if ckpt.path is None:
            raise BadInputError("give an output path (-o): the checkpoint was not loaded from a file.")
        output = onnx_path_for(ckpt.path)
    output = check_writable(output, "-o")
    if ckpt.path is not None and output.resolve() == Path(ckpt.path).resolve():
        raise BadInputError(f"-o {output}: that is the checkpoint itself; choose another output path.")
    if settings.separable:
        check_separable(ckpt)
    return ckpt, output


def _refuse_non_finite(ckpt) -> None:
    """A diverged run (e.g. ``--lr inf``): say so, instead of a "parity lost" after the export."""
    import torch

    bad = [n for n, t in ckpt.state_dict.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise BadInputError(
            f"--ckpt {ckpt.path or 'checkpoint'}: {len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the training run diverged. Retrain with a lower --lr."
        )


def _check_against_torch(model, data: bytes, preprocess, in_shape, settings: ExportSettings, images) -> list:
    """Parity rows of the serialized model against the PyTorch ``model``: photos and seeded random inputs, at
    every batch size of the settings."""
    from atexport.parity import ParitySettings, check_parity, photo_batch
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.torch import TorchRunner

    par = settings.parity
    photos = photo_batch(preprocess, extra=images, max_images=par.get("max_images"))
    with TorchRunner(model) as ref, OnnxRuntimeRunner(data, optimization=par.get("optimization", "all")) as cand:
        return check_parity(
            ref, cand, photos, settings.precision, settings=ParitySettings(
                random_inputs=int(par.get("random_inputs", 8)), seed=int(par.get("seed", 0)),
                batch_sizes=settings.batch_sizes, tolerances=par.get("tolerances", "tolerances"),
                input_shape=in_shape),
        )
