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

from atexport import configs
from atexport.artifact.onnx import check_manifest
from atexport.errors import BadInputError, IncompatibleCheckpointError, require
from atexport.export.module import BATCH_AXIS, MIN_OPSET, bind_initializers, export_module, finish_proto  # noqa: F401


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


def load_export_config(config: str | Mapping = "onnx", **overrides) -> dict:
    """The ``export_configs/onnx.yaml`` preset (or another), with non-``None`` overrides applied.

    Overrides are ``section__key=value`` or plain keys of the ``export`` section.
    """
    data = dict(config) if isinstance(config, Mapping) else configs.load("export_configs", config)
    data.setdefault("export", {})
    data.setdefault("parity", {})
    for k, v in overrides.items():
        if v is None:
            continue
        section, _, key = k.rpartition("__")
        data.setdefault(section or "export", {})[key] = v
    return data


def onnx_path_for(ckpt_path: str | Path) -> Path:
    """``<checkpoint folder>/<checkpoint stem>.onnx``."""
    p = Path(ckpt_path)
    return p.with_name(p.stem + ".onnx")


def failed_path_for(output: str | Path) -> Path:
    """Where a model that failed parity is kept: ``<stem>.failed.onnx`` beside ``output``."""
    from atexport.artifact.onnx import failed_path_for as _failed_path_for

    return Path(_failed_path_for(output))


def swappable_names(ckpt, model) -> list[str]:
    """The tensors a separable export lifts: the checkpoint's adapter and head tensors, model order."""
    if ckpt.regime == "full":
        raise IncompatibleCheckpointError(
            "--separable needs an adapter or head checkpoint; a 'full' fine-tune changes the whole backbone, "
            "so there is no shared backbone to separate. Export it without --separable."
        )
    from atexport.adapters import check_export_mode

    check_export_mode(ckpt.adapter, "separable", f"--separable {ckpt.path or 'checkpoint'}")
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


def export_record(cfg: Mapping, opset: int, batch, trace_batch: int, do_simplify: bool, simplifier) -> dict:
    """What made an exported model (exporter, versions, settings, resolved config), for its metadata."""
    import onnx
    import torch

    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": opset,
        "batch": batch,
        "trace_batch": trace_batch,
        "simplify": do_simplify,
        "simplifier": simplifier if do_simplify else None,
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
        "config_source": cfg.get("_source"),
    }


def export_onnx(
    ckpt,
    output: str | Path | None = None,
    *,
    separable: bool = False,
    batch: int | None = None,
    opset: int | None = None,
    simplify: bool | None = None,
    simplifier: str | None = None,
    verify: bool = True,
    backbone_weights: str | Path | None = None,
    images=None,
    task_name: str | None = None,
    config: str | Mapping = "onnx",
    log=None,
) -> ExportResult:
    """Export a checkpoint to ONNX, verify it against PyTorch, and write it atomically.

    Args:
        ckpt: path of a ``run.pt`` or a loaded :class:`~atexport.checkpoint.Checkpoint`.
        output: model path; default ``<checkpoint stem>.onnx`` beside the checkpoint.
        separable: lift adapter and head tensors to named, swappable initializers (with a manifest).
        batch: fixed batch size; ``None`` takes the preset's (a dynamic batch axis named ``"batch"``).
        opset: ONNX opset (>= 20); default from the preset.
        simplify: run the simplifier (default from the preset: on).
        simplifier: ``"onnxslim"`` or ``"onnxsim"`` (default from the preset).
        verify: check parity against the PyTorch model (on by default; off only to save time).
        backbone_weights: local backbone weights file, for checkpoints whose backbone is not in timm's hub.
        images: extra real images for parity: a folder, or a list of paths or PIL images.
        task_name: the task's name in the metadata (default: the checkpoint's file stem).
        config: export preset name in ``export_configs/`` or a dict.
        log: optional callable receiving progress lines.

    Returns:
        The :class:`ExportResult`.

    Raises:
        BadInputError: missing/unreadable checkpoint, bad flags, unwritable output.
        IncompatibleCheckpointError: the backbone's fingerprint differs, or ``separable`` with a full fine-tune.
        ParityError: the model does not compute what PyTorch computes; it is kept at ``<stem>.failed.onnx``
            (``error.result`` holds the :class:`ExportResult`) and nothing is written at ``output``.
    """
    from atexport.checkpoint import Checkpoint, build_model, load_checkpoint
    from atexport.utils.io import check_writable

    say = log or (lambda *_: None)
    t_start = time.perf_counter()
    cfg = load_export_config(config, opset=opset, batch=batch, simplify=simplify, simplifier=simplifier)
    ex, par = cfg["export"], cfg["parity"]
    opset = int(ex.get("opset", MIN_OPSET))
    batch = ex.get("batch")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise BadInputError(f"--batch {batch}: must be a positive integer (omit it for a dynamic batch axis).")
    if opset < MIN_OPSET:
        raise BadInputError(
            f"--opset {opset}: atexport needs opset >= {MIN_OPSET}, where GELU is one Gelu node and LayerNorm "
            "one LayerNormalization node (decomposed LayerNorm overflows in FP16 on ViTs)."
        )
    do_simplify = bool(ex.get("simplify", True))
    simplifier = str(ex.get("simplifier", "onnxslim"))

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
    task = task_name or ckpt.name
    if verify and images is not None:  # read --images now: a bad image fails before minutes of export
        from atexport.parity.images import load_images

        images = load_images(images, limit=par.get("max_images"))
    require("onnx", "exporting ONNX models", "onnx")
    require("onnxscript", "the PyTorch ONNX exporter (torch.onnx.export(dynamo=True))", "onnx")
    import torch

    bad = [n for n, t in ckpt.state_dict.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # a diverged run (e.g. --lr inf): say so, instead of a "parity lost" after the export
        raise BadInputError(
            f"--ckpt {ckpt.path or 'checkpoint'}: {len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the training run diverged. Retrain with a lower --lr."
        )
    say(f"building {ckpt.model.backbone} from {ckpt.path or 'checkpoint'} ...")
    model = build_model(ckpt, backbone_weights=backbone_weights)
    in_shape = [int(v) for v in ckpt.preprocess["input_size"]]
    trace_batch = int(batch) if batch is not None else max(int(ex.get("trace_batch", 2)), 2)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn((trace_batch, *in_shape), generator=gen)

    lifted = {}
    manifest = {}
    if separable:
        params = dict(model.named_parameters())
        lifted = {n: params[n].detach().clone() for n in swappable_names(ckpt, model)}
        manifest = build_manifest(lifted)  # before simplifying: names are the checkpoint's, by construction

    say(f"exporting ({'separable' if separable else 'fused'}, opset {opset}, "
        f"{'dynamic batch' if batch is None else f'batch {batch}'}) ...")
    t0 = time.perf_counter()
    proto = export_module(model, example, lifted, dynamic_batch=batch is None, opset=opset)
    seconds = {"export": time.perf_counter() - t0}
    nodes = {"exported": len(proto.graph.node), "simplified": None}
    stats = None
    if do_simplify:
        from atexport.export.simplify import require_inputs
        from atexport.export.simplify import simplify as run_simplifier

        say(f"simplifying with {simplifier} ...")
        proto, stats = run_simplifier(proto, simplifier)
        require_inputs(proto, list(lifted))
        nodes["simplified"] = stats.nodes_after
        seconds["simplify"] = stats.seconds
    if lifted:
        bind_initializers(proto, lifted)
        check_manifest(proto, manifest, "exported model")

    extra = {
        "export": export_record(cfg, opset, batch, trace_batch, do_simplify, simplifier),
        "nodes": nodes,
        "ops": {k: v for k, v in op_counts(proto).items() if k in ("LayerNormalization", "Gelu", "Erf", "Gemm", "MatMul")},
        "checkpoint": {"file": Path(ckpt.path).name if ckpt.path else None, "metrics": ckpt.metrics},
        "parity": None,
    }
    meta = _metadata(
        ckpt, input_name="input", output_name="logits", batch=batch, separable=separable,
        manifest=manifest, task=task, extra=extra,
    )

    finish_proto(proto, meta, f"{ckpt.model.backbone} {ckpt.regime} task {task!r}", "the exported model")

    result = ExportResult(path=None, metadata=meta, nodes=nodes, simplifier=simplifier if do_simplify else None)
    data = proto.SerializeToString()
    if verify:
        from atexport.runtime.onnxruntime import OnnxRuntimeRunner
        from atexport.runtime.torch import TorchRunner
        from atexport.parity import ParitySettings, check_parity, photo_batch

        say("checking parity against PyTorch ...")
        t0 = time.perf_counter()
        photos = photo_batch(ckpt.preprocess, extra=images, max_images=par.get("max_images"))
        sizes = [int(batch)] if batch is not None else [int(b) for b in par.get("batch_sizes", [1, 4])]
        with TorchRunner(model) as ref, OnnxRuntimeRunner(data, optimization=par.get("optimization", "all")) as cand:
            result.parity = check_parity(
                ref, cand, photos, par.get("precision", "fp32"), settings=ParitySettings(
                    random_inputs=int(par.get("random_inputs", 8)), seed=int(par.get("seed", 0)),
                    batch_sizes=sizes, tolerances=par.get("tolerances", "tolerances"), input_shape=in_shape),
            )
        seconds["verify"] = time.perf_counter() - t0

    from atexport.export.write import write_export

    write_export(proto, data, result, output,
                 f"the exported model does not match PyTorch within the {par.get('precision', 'fp32')} tolerances",
                 verify=verify, seconds=seconds, t_start=t_start, failed_path=failed_path_for(output))
    return result
