"""Multi-task ONNX models: one frozen backbone, a bank of K adapter sets and heads, mixed-task batches.

:func:`export_multitask` (``atexport onnx --ckpt a.pt --ckpt b.pt --multitask``) exports one model
holding the backbone once and, for every task, its adapters and head stacked along a leading *task
axis* (the *bank*). Inputs: ``input`` (the image batch, float32 NCHW) and ``task_id`` (int64 ``[N]``,
an index into ``metadata.tasks``, one per sample); output: ``logits`` ``[N, max_classes]``. Each row
holds its task's logits in its first ``tasks[i]["num_classes"]`` columns; the remaining columns are
exactly :data:`PAD_LOGIT` (-1e4: finite, exact in FP16, never an argmax or a softmax mass in
practice). Apps slice each row to its task's class count (the torch-free runtime does).

Layout (``gather``, measured in ``bench/RESULTS.md``): per sample, ``Gather(bank, task_id)`` picks the
task's ``[D, r]`` / ``[r, D]`` / ``[D, C]`` weights and a batched ``MatMul`` applies them, so every
sample costs exactly what it costs in a single-task model; computing all K adapters and selecting
would multiply the adapter work by K. The bank tensors are ordinary weights: graph inputs with
initializers of the same name (overridable initializers, see :mod:`atexport.export.onnx`), listed in
the metadata ``manifest`` with how a task's checkpoint tensor maps to its slice (transpose, padding).
The task axis is the symbolic dimension ``"tasks"`` and appears in no node, so :func:`add_task`,
:func:`remove_task` and replacing a task rewrite only the bank initializers and the metadata (no
re-tracing), and a TensorRT refit can replace one task's slice in place.

Every sample's logits equal its task's single-task export at float32 rounding: export checks this
(parity against each task's own PyTorch model, on mixed batches), and ``tests/test_multitask.py``
checks it against ``export_onnx`` of each checkpoint, in FP32, FP16 and INT8.

All checkpoints must share the backbone (name, architecture overrides, fingerprint), the regime
(``adapter`` or ``head``), the adapter rank, placement (``every``) and scale ``alpha`` (baked into the
graph), and the preprocessing; anything else is refused with the files named.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from atexport import __version__
from atexport.errors import AtexportError, BadInputError, IncompatibleCheckpointError, ParityError, require
from atexport.export.onnx import ExportResult, export_record
from atexport.runtime.base import Runner

PAD_LOGIT = -1.0e4
TASK_INPUT = "task_id"
TASK_AXIS = "tasks"
BANK_PREFIX = "bank."
LAYOUT = "gather"
REGIMES = ("adapter", "head")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


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
        layout = f"rank {ad['rank']}, every {ad['every']}, alpha {ad['alpha']}" if ad else "head only"
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
        if self.nodes.get("simplified") is not None:
            lines.append(
                f"nodes:      {self.nodes['exported']} exported -> {self.nodes['simplified']} after {self.simplifier}"
            )
        else:
            lines.append(f"nodes:      {self.nodes.get('exported')} (not simplified)")
        lines.append(f"size:       {self.size_bytes / 1e6:.2f} MB")
        lines.append("time:       " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


@dataclass
class TaskEditResult:
    """What :func:`add_task` or :func:`remove_task` wrote.

    Attributes:
        path: the written model.
        metadata: its metadata (``tasks`` and ``manifest`` updated).
        action: ``add``, ``replace`` or ``remove``.
        task: the task's name.
        unchanged_max_abs: largest logit change of the untouched tasks (checked, expected 0).
        seconds: wall time.
    """

    path: Path
    metadata: Any
    action: str
    task: str
    unchanged_max_abs: float = 0.0
    seconds: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Checking that checkpoints belong together
# --------------------------------------------------------------------------------------------------


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _label(ckpt) -> str:
    return Path(ckpt.path).name if getattr(ckpt, "path", None) else "checkpoint"


def default_task_name(ckpt) -> str:
    """A checkpoint's task name: its file stem, or its folder's name for ``atexport train``'s ``run.pt``."""
    p = getattr(ckpt, "path", None)
    if p is None:
        return "task"
    p = Path(p)
    return p.parent.name if p.stem == "run" and p.parent.name else p.stem


def task_fingerprint(state_dict: Mapping[str, Any]) -> str:
    """sha256 over a task's tensors (names, shapes, float32 bytes): identifies a task's weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        a = _as_f32(state_dict[name])
        h.update(name.encode())
        h.update(str(tuple(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _as_f32(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def _family(ckpt) -> dict:
    """What must be equal for two checkpoints to share one multi-task model."""
    ad = ckpt.adapter.to_dict() if ckpt.adapter else None
    return {
        "backbone": ckpt.model.backbone,
        "backbone overrides": ckpt.model.model_args,
        "backbone fingerprint": ckpt.fingerprint,
        "regime": ckpt.regime,
        "adapter rank": ad and int(ad["rank"]),
        "adapter placement (every)": ad and int(ad["every"]),
        "adapter scale alpha": ad and float(ad["alpha"]),
        "preprocessing": ckpt.preprocess,
    }


def _show(key, value) -> str:
    if key == "backbone fingerprint":
        return str(value)[:12]
    if key == "preprocessing":
        return "(differs)"
    return repr(value)


def check_same_family(ckpts: Sequence) -> None:
    """Refuse checkpoints that cannot share one backbone and one bank layout, naming the files.

    Raises:
        IncompatibleCheckpointError: every mismatch, ``file: what != first file's``.
    """
    first = ckpts[0]
    if first.regime not in REGIMES:
        raise IncompatibleCheckpointError(
            f"{_label(first)}: regime {first.regime!r} changes the whole backbone, so there is no shared backbone "
            f"to serve several tasks from; multi-task models take {' or '.join(REGIMES)} checkpoints."
        )
    ref = _family(first)
    reasons = []
    for ck in ckpts[1:]:
        fam = _family(ck)
        for key, value in fam.items():
            if _canon(value) != _canon(ref[key]):
                reasons.append(f"{_label(ck)}: {key} {_show(key, value)} != {_label(first)}'s {_show(key, ref[key])}")
    if reasons:
        raise IncompatibleCheckpointError(
            "these checkpoints cannot share one multi-task model (same backbone, regime, adapter rank, placement "
            "and alpha needed): " + "; ".join(reasons[:8]) + "."
        )


# --------------------------------------------------------------------------------------------------
# The bank: layout, manifest, task slices (numpy only)
# --------------------------------------------------------------------------------------------------


def bank_layout(dim: int, rank: int | None, placed: Sequence[int], max_classes: int) -> dict[str, dict]:
    """The bank's tensors (without the task axis) and where each task's slice comes from.

    Returns:
        ``{initializer name: {"source": checkpoint tensor, "shape": slice shape, "transpose": bool,
        "pad_value": value of padded classes or None, "role", "block"}}``, in graph-input order.
    """
    out: dict[str, dict] = {}
    if rank is not None:
        for i in placed:
            for part, w_shape, b_len in (("down", [dim, rank], rank), ("up", [rank, dim], dim)):
                src = f"blocks.{i}.adapter.{part}"
                out[f"{BANK_PREFIX}{src}.weight"] = {"source": f"{src}.weight", "shape": w_shape, "transpose": True,
                                                   "pad_value": None, "role": "adapter", "block": i}
                out[f"{BANK_PREFIX}{src}.bias"] = {"source": f"{src}.bias", "shape": [b_len], "transpose": False,
                                                 "pad_value": None, "role": "adapter", "block": i}
    out[f"{BANK_PREFIX}head.weight"] = {"source": "head.weight", "shape": [dim, max_classes], "transpose": True,
                                        "pad_value": 0.0, "role": "head"}
    out[f"{BANK_PREFIX}head.bias"] = {"source": "head.bias", "shape": [max_classes], "transpose": False,
                                      "pad_value": PAD_LOGIT, "role": "head"}
    return out


def bank_manifest(layout: Mapping[str, dict], tasks: int) -> dict:
    """The metadata manifest of a bank of ``tasks`` tasks: initializer, shape (task axis first), dtype,
    role, block, and the ``bank`` recipe turning a checkpoint tensor into a task's slice."""
    out = {}
    for name, e in layout.items():
        entry = {
            "initializer": name,
            "shape": [int(tasks), *[int(v) for v in e["shape"]]],
            "dtype": "float32",
            "role": e["role"],
            "bank": {"axis": 0, "source": e["source"], "transpose": bool(e["transpose"]), "pad_value": e["pad_value"]},
        }
        if "block" in e:
            entry["block"] = int(e["block"])
        out[name] = entry
    return out


def task_slice(entry: Mapping, tensor) -> np.ndarray:
    """One task's slice of a bank tensor from its checkpoint tensor (transposed and padded as recorded).

    Torch-free (numpy arrays are accepted), so a runtime or a TensorRT refit can build slices too.
    """
    b = entry["bank"]
    a = _as_f32(tensor)
    if b["transpose"]:
        a = np.ascontiguousarray(a.T)
    want = list(entry["shape"][1:])
    if b.get("pad_value") is not None and list(a.shape) != want:
        if a.ndim != len(want) or list(a.shape[:-1]) != want[:-1] or a.shape[-1] > want[-1]:
            raise IncompatibleCheckpointError(
                f"{b['source']} of shape {list(_as_f32(tensor).shape)} does not fit the bank's {want} "
                f"(the model holds at most {want[-1]} classes)."
            )
        pad = [(0, 0)] * (a.ndim - 1) + [(0, want[-1] - a.shape[-1])]
        a = np.pad(a, pad, constant_values=np.float32(b["pad_value"]))
    if list(a.shape) != want:
        raise IncompatibleCheckpointError(f"{b['source']} of shape {list(a.shape)} does not fit the bank's {want}.")
    return np.ascontiguousarray(a, dtype=np.float32)


def task_slices(manifest: Mapping[str, dict], state_dict: Mapping[str, Any], where: str = "the checkpoint") -> dict:
    """Every bank tensor's slice for one task: ``{initializer: array}``; the tensors must match exactly."""
    sources = {e["bank"]["source"] for e in manifest.values()}
    missing = sorted(sources - set(state_dict))
    extra = sorted(set(state_dict) - sources)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"tensors missing: {missing[:5]}")
        if extra:
            parts.append(f"tensors the multi-task model has no place for: {extra[:5]}")
        raise IncompatibleCheckpointError(f"{where} does not fit the bank: {'; '.join(parts)}.")
    out = {}
    for name, e in manifest.items():
        try:
            out[name] = task_slice(e, state_dict[e["bank"]["source"]])
        except IncompatibleCheckpointError as err:
            raise IncompatibleCheckpointError(f"{where}: {err}") from None
    return out


def _task_entry(ckpt, name: str, index: int) -> dict:
    return {
        "name": name,
        "index": int(index),
        "num_classes": int(ckpt.model.num_classes),
        "class_names": list(ckpt.model.class_names) if ckpt.model.class_names else None,
        "fingerprint": task_fingerprint(ckpt.state_dict),
        "source": Path(ckpt.path).name if ckpt.path else None,
        "metrics": dict(ckpt.metrics or {}),
    }


# --------------------------------------------------------------------------------------------------
# The PyTorch module that is exported
# --------------------------------------------------------------------------------------------------


class _Modules:
    """The torch modules, defined on first use (torch is imported only when exporting)."""

    classes = None

    @classmethod
    def get(cls):
        if cls.classes is not None:
            return cls.classes
        import torch
        from torch import nn

        class TaskContext:
            """The per-call ``task_id``, shared by the bank layers (set by ``MultiTaskModel.forward``)."""

            task_id = None

        class BankLinear(nn.Module):
            """``y = x @ weight[task_id] + bias[task_id]`` per sample; weight ``[K, in, out]``, bias ``[K, out]``."""

            def __init__(self, ctx, tasks: int, d_in: int, d_out: int):
                super().__init__()
                self.ctx = ctx
                self.weight = nn.Parameter(torch.zeros(tasks, d_in, d_out), requires_grad=False)
                self.bias = nn.Parameter(torch.zeros(tasks, d_out), requires_grad=False)

            def forward(self, x):  # x: [N, T, in]
                t = self.ctx.task_id
                w = torch.index_select(self.weight, 0, t)  # ONNX Gather -> [N, in, out]
                b = torch.index_select(self.bias, 0, t).unsqueeze(1)  # [N, 1, out]
                return torch.matmul(x, w) + b  # batched MatMul, one GEMM per sample

        class BankAdapter(nn.Module):
            """AdapterTune's ``alpha * up(gelu(down(x)))`` with per-sample task weights."""

            def __init__(self, ctx, tasks, dim, rank, alpha):
                super().__init__()
                self.down = BankLinear(ctx, tasks, dim, rank)
                self.up = BankLinear(ctx, tasks, rank, dim)
                self.act = nn.GELU()
                self.alpha = float(alpha)

            def forward(self, x):
                return self.alpha * self.up(self.act(self.down(x)))

        class BlockBank(nn.Module):
            def __init__(self, adapter):
                super().__init__()
                self.adapter = adapter

        class Bank(nn.Module):
            """Named so that parameters read ``blocks.{i}.adapter.down.weight``, ``head.weight``."""

            def __init__(self, ctx, tasks, dim, rank, alpha, placed, classes):
                super().__init__()
                self.blocks = nn.ModuleDict(
                    {str(i): BlockBank(BankAdapter(ctx, tasks, dim, rank, alpha)) for i in placed}
                )
                self.head = BankLinear(ctx, tasks, dim, classes)

        class BankBlock(nn.Module):
            """A frozen timm block followed by its bank adapter (``x = block(x); x = x + adapter(x)``)."""

            def __init__(self, block, bank_block):
                super().__init__()
                self.block = block
                self._bank = [bank_block]  # not registered twice: the parameters live under ``bank``

            def forward(self, x):
                x = self.block(x)
                return x + self._bank[0].adapter(x)

        class BankHead(nn.Module):
            def __init__(self, head):
                super().__init__()
                self._head = [head]

            def forward(self, x):  # pooled features [N, D] -> [N, C]
                return self._head[0](x.unsqueeze(1)).squeeze(1)

        class MultiTaskModel(nn.Module):
            """``forward(x, task_id)``: the timm ViT with its blocks and head reading the task bank."""

            def __init__(self, vit, tasks, rank, alpha, placed, classes):
                super().__init__()
                self.ctx = TaskContext()
                dim = int(vit.embed_dim)
                self.bank = Bank(self.ctx, tasks, dim, rank, alpha, placed if rank else [], classes)
                blocks = list(vit.blocks)
                for i in (placed if rank else []):
                    blocks[i] = BankBlock(blocks[i], self.bank.blocks[str(i)])
                vit.blocks = nn.Sequential(*blocks)
                vit.head = BankHead(self.bank.head)
                self.vit = vit

            def forward(self, x, task_id):
                self.ctx.task_id = task_id
                try:
                    return self.vit(x)
                finally:
                    self.ctx.task_id = None

        cls.classes = {"MultiTaskModel": MultiTaskModel}
        return cls.classes


def build_multitask_model(ckpts: Sequence, max_classes: int, backbone_weights=None):
    """The PyTorch multi-task model of ``ckpts`` (bank filled) and its bank tensors by initializer name.

    Returns:
        ``(module, layout, bank)``: the eval-mode module (``module(x, task_id)``), the bank layout
        (:func:`bank_layout`) and ``{initializer: torch tensor [K, ...]}``.
    """
    import torch

    from atexport.checkpoint import check_fingerprint
    from atexport.models import create_backbone

    first = ckpts[0]
    vit = create_backbone(first.model, weights=backbone_weights)
    check_fingerprint(first.fingerprint, vit, f"checkpoint {first.path or ''}".strip())
    if not hasattr(vit, "blocks") or not isinstance(vit.blocks, torch.nn.Sequential) or not hasattr(vit, "head"):
        raise IncompatibleCheckpointError(
            f"{first.model.backbone} has no 'blocks' sequence and 'head'; multi-task export needs a timm ViT-family model."
        )
    depth = len(vit.blocks)
    ad = first.adapter
    rank = int(ad.rank) if ad is not None else None
    placed = ad.placed(depth) if ad is not None else []
    dim = int(vit.embed_dim)
    layout = bank_layout(dim, rank, placed, max_classes)
    manifest = bank_manifest(layout, len(ckpts))
    slices = [task_slices(manifest, ck.state_dict, f"checkpoint {_label(ck)}") for ck in ckpts]
    model = _Modules.get()["MultiTaskModel"](vit, len(ckpts), rank, ad.alpha if ad else 1.0, placed, max_classes)
    params = dict(model.named_parameters())
    bank = {}
    with torch.no_grad():
        for name in layout:
            stacked = torch.from_numpy(np.stack([s[name] for s in slices]))
            params[name].copy_(stacked)
            bank[name] = params[name].detach().clone()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), layout, bank


# --------------------------------------------------------------------------------------------------
# Runners that feed task ids
# --------------------------------------------------------------------------------------------------


class TaskRunner(Runner):
    """Runs one task of a multi-task model through another runner: feeds ``task_id`` (every sample the
    same task) and returns that task's logits only (``[N, num_classes]``, padding cut off).

    The wrapped runner is activated on demand and left as it is on exit (its owner closes it), so one
    session serves several TaskRunners.

    Args:
        runner: a runner of the multi-task model (ONNX Runtime, TensorRT, PyTorch ``model(x, task_id=...)``).
        index: the task's index (``metadata.tasks[i]["index"]``).
        num_classes: the task's class count (columns kept); ``None`` keeps all.
        input_name: name of the task input.
    """

    def __init__(self, runner: Runner, index: int, num_classes: int | None = None, input_name: str = TASK_INPUT,
                 name: str | None = None):
        super().__init__()
        self.runner, self.index, self.num_classes, self.input_name = runner, int(index), num_classes, input_name
        self.name = name or f"{getattr(runner, 'name', 'runner')}[task {index}]"

    def _activate(self):
        self.runner.activate()

    def _infer(self, batch, **feeds):
        ids = np.full((len(batch),), self.index, dtype=np.int64)
        y = self.runner.infer(batch, **{self.input_name: ids}, **feeds)
        return y if self.num_classes is None else np.ascontiguousarray(y[:, : self.num_classes])


def task_input(meta) -> tuple[str, int] | None:
    """``(task input name, number of tasks)`` of a multi-task model's metadata, ``None`` otherwise."""
    if not getattr(meta, "tasks", None):
        return None
    spec = (meta.extra or {}).get("task_input") or {}
    return str(spec.get("name", TASK_INPUT)), len(meta.tasks)


def task_runners(meta, runner: Runner) -> list[tuple[dict, TaskRunner]]:
    """One :class:`TaskRunner` per task of ``meta`` over ``runner``: ``[(task entry, runner), ...]``."""
    name, _ = task_input(meta) or (TASK_INPUT, 0)
    return [
        (t, TaskRunner(runner, t["index"], t["num_classes"], name, name=f"{getattr(runner, 'name', 'runner')}[{t['name']}]"))
        for t in sorted(meta.tasks, key=lambda t: t["index"])
    ]


def mixed_task_ids(n: int, tasks: int, offset: int = 0) -> np.ndarray:
    """Task ids ``offset, offset+1, ...`` modulo ``tasks``: consecutive samples of different tasks."""
    return ((np.arange(n) + int(offset)) % max(int(tasks), 1)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _names(ckpts, task_names) -> list[str]:
    if task_names:
        names = [str(n) for n in task_names]
        if len(names) != len(ckpts):
            raise BadInputError(
                f"{len(names)} task names for {len(ckpts)} checkpoints: give one --task-name per --ckpt, in order."
            )
    else:
        names = [default_task_name(ck) for ck in ckpts]
        if len(set(names)) != len(names):
            stems = [Path(ck.path).stem if ck.path else "task" for ck in ckpts]
            names = stems if len(set(stems)) == len(stems) else names
    if any(not n.strip() for n in names):
        raise BadInputError("task names must not be empty.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(
            f"task names {dup} are used twice (from the checkpoints' file or folder names); "
            "give each checkpoint its own --task-name."
        )
    return names


def default_output(ckpts) -> Path:
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
    from atexport.export.onnx import BATCH_AXIS
    from atexport.metadata import ModelMetadata

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
        tasks=[_task_entry(ck, n, i) for i, (ck, n) in enumerate(zip(ckpts, names))],
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
        task_names: one name per checkpoint (default: file stem, or folder name for ``run.pt``).
        max_classes: width of the logits, i.e. the most classes any task (also one added later with
            :func:`add_task`) may have; default: the largest class count among ``ckpts``.
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
    from atexport.export.onnx import (
        MIN_OPSET,
        PROTOBUF_LIMIT,
        bind_initializers,
        check_manifest,
        export_module,
        failed_path_for,
        load_export_config,
        op_counts,
    )
    from atexport.utils.io import atomic_write_bytes, check_writable

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

    ckpts = [ck if isinstance(ck, Checkpoint) else load_checkpoint(ck) for ck in ckpts]
    check_same_family(ckpts)
    names = _names(ckpts, task_names)
    widest = max(int(ck.model.num_classes) for ck in ckpts)
    if max_classes is None:
        max_classes = widest
    elif isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < widest:
        raise BadInputError(
            f"--max-classes {max_classes}: must be an integer >= the largest task's class count ({widest})."
        )
    output = check_writable(output if output is not None else default_output(ckpts), "-o")
    for ck in ckpts:
        if ck.path is not None and output.resolve() == Path(ck.path).resolve():
            raise BadInputError(f"-o {output}: that is a checkpoint; choose another output path.")
    require("onnx", "exporting ONNX models", "onnx")
    require("onnxscript", "the PyTorch ONNX exporter (torch.onnx.export(dynamo=True))", "onnx")
    import onnx
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
    from atexport.metadata import write_onnx_metadata

    proto.producer_name, proto.producer_version = "atexport", __version__
    proto.doc_string = (f"{ckpts[0].model.backbone} {ckpts[0].regime}, {len(ckpts)} tasks "
                        f"({', '.join(names[:8])}{'...' if len(names) > 8 else ''}), exported by atexport {__version__}")
    write_onnx_metadata(proto, meta)
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise BadInputError(f"the multi-task model is {proto.ByteSize() / 1e9:.1f} GB, over protobuf's 2 GB limit.")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise AtexportError(f"the multi-task model fails onnx.checker ({str(e).splitlines()[0][:300]}); a bug.") from e

    result = MultiTaskResult(path=None, metadata=meta, nodes=nodes, simplifier=simplifier if do_simplify else None)
    data = proto.SerializeToString()
    if verify:
        say("checking every task against its own PyTorch model, on mixed-task batches ...")
        t0 = time.perf_counter()
        result.parity = _verify_against_single_task(data, meta, ckpts, backbone_weights, images, par, in_shape, batch)
        seconds["verify"] = time.perf_counter() - t0
        meta.extra["parity"] = [r.to_dict() for r in result.parity]
        write_onnx_metadata(proto, meta)
        data = proto.SerializeToString()
    seconds["total"] = time.perf_counter() - t_start
    result.seconds = seconds
    result.size_bytes = len(data)
    if verify and not result.passed:
        from atexport.verify.compare import format_table

        failed = failed_path_for(output)
        atomic_write_bytes(failed, data)
        result.failed_path = failed
        err = ParityError(
            "the multi-task model does not match the tasks' own PyTorch models within the "
            f"{par.get('precision', 'fp32')} tolerances:\n{format_table([r for r in result.parity if not r.passed])}\n"
            f"Nothing was written to {output}; the failing model is kept at {failed}."
        )
        err.result = result
        raise err
    atomic_write_bytes(output, data)
    result.path = output
    return result


def run_mixed(runner: Runner, x: np.ndarray, ids: np.ndarray, batch_size: int, input_name: str = TASK_INPUT):
    """Run ``x`` with per-sample task ids in chunks of exactly ``batch_size`` (last chunk padded, trimmed)."""
    outs = []
    for i in range(0, len(x), batch_size):
        xb, tb = x[i : i + batch_size], ids[i : i + batch_size]
        n = len(xb)
        if n < batch_size:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - n, axis=0)])
            tb = np.concatenate([tb, np.repeat(tb[-1:], batch_size - n)])
        outs.append(runner.infer(xb, **{input_name: np.ascontiguousarray(tb, dtype=np.int64)})[:n])
    return np.concatenate(outs)


def _verify_against_single_task(data, meta, ckpts, backbone_weights, images, par, in_shape, batch):
    """Each task's rows of mixed-task batches against that task's own single-task PyTorch model."""
    from atexport.checkpoint import build_model
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.torch import TorchRunner
    from atexport.verify.compare import load_tolerances
    from atexport.verify.parity import photo_batch, random_batch

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
                y = run_mixed(cand, x, ids, bs)
                rows += _task_rows(meta, y, ids, refs, kind, bs, tol)
    return rows


def _task_rows(meta, y, ids, refs, kind, bs, tol):
    from atexport.verify.compare import compare

    out = []
    for t in meta.tasks:
        i, c = t["index"], t["num_classes"]
        rows = y[ids == i]
        r = compare(refs[(i, kind)], rows[:, :c], tol, name=f"{t['name']} {kind} (batch {bs})")
        if rows.shape[1] > c and not np.all(rows[:, c:] == np.float32(PAD_LOGIT)):
            r.failures.append(f"padded logits are not {PAD_LOGIT:g}")
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------------
# Editing a deployed model: list, add, replace, remove (no re-tracing)
# --------------------------------------------------------------------------------------------------


def _read_multitask(model, flag: str = "--model"):
    from atexport.export.swap import read_onnx
    from atexport.metadata import read_onnx_metadata

    if isinstance(model, (str, os.PathLike)):
        proto, where = read_onnx(model, flag), f"{flag} {model}"
    else:
        proto, where = model, "the model"
    meta = read_onnx_metadata(proto, where)
    if not meta.tasks or "multitask" not in (meta.extra or {}):
        raise BadInputError(
            f"{where} is a single-task model; tasks can be added to models exported with "
            "'atexport onnx --ckpt A --ckpt B ... --multitask' (for a single-task separable model use 'atexport swap')."
        )
    return proto, meta, where


def list_tasks(model) -> list[dict]:
    """The tasks of a multi-task model (path or ``onnx.ModelProto``), in index order."""
    _, meta, _ = _read_multitask(model)
    return sorted(meta.tasks, key=lambda t: t["index"])


def check_task_fits(meta, ckpt, where: str = "the model") -> None:
    """Refuse a checkpoint that cannot join the multi-task model ``meta`` (every reason listed)."""
    name = f"checkpoint {ckpt.path}" if getattr(ckpt, "path", None) else "the checkpoint"
    bb = meta.backbone or {}
    reasons = []
    if ckpt.model.backbone != bb.get("name"):
        reasons.append(f"backbone {ckpt.model.backbone} != the model's {bb.get('name')}")
    if _canon(ckpt.model.model_args) != _canon(bb.get("model_args") or {}):
        reasons.append(f"backbone overrides {ckpt.model.model_args} != the model's {bb.get('model_args')}")
    if ckpt.fingerprint != bb.get("fingerprint"):
        reasons.append(f"backbone fingerprint {str(ckpt.fingerprint)[:12]} != the model's "
                       f"{str(bb.get('fingerprint'))[:12]} (adapters trained on another backbone)")
    if ckpt.regime != meta.regime:
        reasons.append(f"regime {ckpt.regime!r} != the model's {meta.regime!r}")
    m_ad, c_ad = meta.adapter, ckpt.adapter.to_dict() if ckpt.adapter else None
    if (m_ad is None) != (c_ad is None):
        reasons.append("the model has adapters and the checkpoint none" if m_ad else
                       "the checkpoint has adapters, the model none")
    elif m_ad and c_ad:
        for key, label in (("rank", "adapter rank"), ("every", "adapter placement every")):
            if int(c_ad[key]) != int(m_ad[key]):
                reasons.append(f"{label} {c_ad[key]} != the model's {m_ad[key]}")
        if float(c_ad["alpha"]) != float(m_ad["alpha"]):
            reasons.append(f"adapter scale alpha={c_ad['alpha']} != the model's {m_ad['alpha']} (baked into the graph)")
    cap = int(meta.extra["multitask"]["max_classes"])
    if int(ckpt.model.num_classes) > cap:
        reasons.append(
            f"{ckpt.model.num_classes} classes > the model's capacity of {cap} (its logits width, fixed at export: "
            "re-export with 'atexport onnx --multitask --max-classes N' to serve wider heads)"
        )
    if meta.preprocess and _canon(ckpt.preprocess) != _canon(meta.preprocess):
        reasons.append("preprocessing differs from the model's")
    if reasons:
        raise IncompatibleCheckpointError(f"{name} does not fit {where}: " + "; ".join(reasons) + ".")


def _banks(proto, meta, where):
    from onnx import numpy_helper

    from atexport.export.onnx import check_manifest

    check_manifest(proto, meta.manifest, where)
    inits = {i.name: i for i in proto.graph.initializer}
    return {name: numpy_helper.to_array(inits[e["initializer"]]) for name, e in meta.manifest.items()}


def _write_banks(proto, meta, banks: Mapping[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name in banks:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(banks[init.name]), init.name))
    for name, a in banks.items():
        meta.manifest[name]["shape"] = [int(v) for v in a.shape]
    meta.extra["multitask"]["tasks"] = len(meta.tasks)


def _probe(data: bytes, meta, ids: np.ndarray) -> np.ndarray:
    """Logits of a fixed random batch for the given task ids (in chunks the model accepts)."""
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    b = meta.input["shape"][0]
    bs = int(b) if isinstance(b, int) else 16
    x = np.random.default_rng(0).standard_normal((1, *meta.input["shape"][1:])).astype(np.float32)
    x = np.repeat(x, len(ids), axis=0) + np.linspace(-1, 1, len(ids), dtype=np.float32)[:, None, None, None]
    name, _ = task_input(meta)
    with OnnxRuntimeRunner(data) as r:
        return run_mixed(r, x, ids, bs, name)


def _edit(proto, meta, where, banks, output, action, task, kept: Mapping[int, int], t0) -> TaskEditResult:
    """Write banks and metadata, check the untouched tasks still give the same logits, write atomically.

    ``kept`` maps old index -> new index of the tasks that must be unchanged.
    """
    from atexport.metadata import write_onnx_metadata
    from atexport.utils.io import atomic_write_bytes

    before = proto.SerializeToString()
    _write_banks(proto, meta, banks)
    meta.extra.setdefault("task_edits", []).append(
        {"action": action, "task": task, "tasks": len(meta.tasks), "atexport": __version__,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )
    write_onnx_metadata(proto, meta)
    data = proto.SerializeToString()
    old_ids = np.array(sorted(kept), dtype=np.int64)
    worst = 0.0
    y_new = _probe(data, meta, np.arange(len(meta.tasks), dtype=np.int64))
    if not np.isfinite(y_new).all():
        raise AtexportError(f"{where}: the edited model gives non-finite logits (a bug); nothing was written.")
    if len(old_ids):
        y_old = _probe(before, meta, old_ids)
        new_ids = np.array([kept[i] for i in old_ids.tolist()], dtype=np.int64)
        y_kept = _probe(data, meta, new_ids)
        worst = float(np.abs(y_old - y_kept).max())
        if worst > 1e-5:
            raise AtexportError(
                f"{where}: editing the bank changed the logits of untouched tasks (max abs {worst:.3g}); a bug. "
                "Nothing was written."
            )
    atomic_write_bytes(output, data)
    return TaskEditResult(path=Path(output), metadata=meta, action=action, task=task, unchanged_max_abs=worst,
                          seconds={"total": time.perf_counter() - t0})



def _output_for(model, output):
    from atexport.utils.io import check_writable

    if output is None:
        if not isinstance(model, (str, os.PathLike)):
            raise BadInputError("give an output path (-o): the model was not read from a file.")
        output = model  # edited in place, atomically
    return check_writable(output, "-o")


def add_task(model, ckpt, output=None, *, name: str | None = None, replace: bool = False) -> TaskEditResult:
    """Add a task (or, with ``replace=True``, replace one) in a multi-task model, without re-tracing.

    The checkpoint is checked against the model (backbone fingerprint, regime, rank, placement, alpha,
    preprocessing, class count within the model's ``max_classes``), its slice appended to every bank
    tensor (or written over the task's slice), the metadata's ``tasks`` and ``manifest`` updated, the
    model run once to check that the other tasks' logits did not change, and the file written
    atomically. The new task gets the next index; a replaced task keeps its index.

    Args:
        model: the multi-task model (path or ``onnx.ModelProto``; FP32 or FP16).
        ckpt: the task's checkpoint (path or :class:`~atexport.checkpoint.Checkpoint`).
        output: where to write; default: the model file itself (replaced atomically).
        name: the task's name; default the checkpoint's file stem (folder name for ``run.pt``).
        replace: replace the task of that name (its index and the others' stay).

    Raises:
        BadInputError: not a multi-task model, an INT8 model, name taken (without ``replace``) or unknown
            (with ``replace``), bad output path.
        IncompatibleCheckpointError: the checkpoint does not fit (every reason listed).
    """
    from atexport.checkpoint import Checkpoint, load_checkpoint

    t0 = time.perf_counter()
    proto, meta, where = _read_multitask(model)
    _refuse_int8(meta, where)
    out = _output_for(model, output)
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    name = str(name or default_task_name(ckpt))
    check_task_fits(meta, ckpt, where)
    slices = task_slices(meta.manifest, ckpt.state_dict, f"checkpoint {_label(ckpt)}")
    by_name = {t["name"]: t for t in meta.tasks}
    banks = _banks(proto, meta, where)
    k = len(meta.tasks)
    if replace:
        if name not in by_name:
            raise BadInputError(f"{where} has no task {name!r} to replace; it has {sorted(by_name)}.")
        idx = int(by_name[name]["index"])
        for b in banks:
            banks[b] = banks[b].copy()
            banks[b][idx] = slices[b]
        meta.tasks[[t["index"] for t in meta.tasks].index(idx)] = _task_entry(ckpt, name, idx)
        kept = {i: i for i in range(k) if i != idx}
    else:
        if name in by_name:
            raise BadInputError(
                f"{where} already has a task {name!r}; replace it with --replace, or pick another --name."
            )
        idx = k
        for b in banks:
            banks[b] = np.concatenate([banks[b], slices[b][None]], axis=0)
        meta.tasks.append(_task_entry(ckpt, name, idx))
        kept = {i: i for i in range(k)}
    return _edit(proto, meta, where, banks, out, "replace" if replace else "add", name, kept, t0)


def remove_task(model, name: str, output=None) -> TaskEditResult:
    """Remove a task from a multi-task model; the tasks after it move down one index.

    Apps must map task names to indices through the metadata (the runtime does); the last task cannot
    be removed.

    Raises:
        BadInputError: not a multi-task model, an INT8 model, unknown task, last task, bad output path.
    """
    t0 = time.perf_counter()
    proto, meta, where = _read_multitask(model)
    _refuse_int8(meta, where)
    out = _output_for(model, output)
    by_name = {t["name"]: t for t in meta.tasks}
    if name not in by_name:
        raise BadInputError(f"{where} has no task {name!r}; it has {sorted(by_name)}.")
    if len(meta.tasks) == 1:
        raise BadInputError(
            f"{where}: {name!r} is its only task; a multi-task model needs at least one (delete the file instead)."
        )
    idx = int(by_name[name]["index"])
    banks = {b: np.delete(a, idx, axis=0) for b, a in _banks(proto, meta, where).items()}
    tasks = [t for t in sorted(meta.tasks, key=lambda t: t["index"]) if t["name"] != name]
    kept = {}
    for new, t in enumerate(tasks):
        kept[int(t["index"])] = new
        t["index"] = new
    meta.tasks = tasks
    return _edit(proto, meta, where, banks, out, "remove", name, kept, t0)


# --------------------------------------------------------------------------------------------------
# A TensorRT refit of one task (numpy only; atexport.export.tensorrt.refit_engine applies it)
# --------------------------------------------------------------------------------------------------


def read_banks(path, meta, where: str = "the model") -> dict[str, np.ndarray]:
    """The bank tensors ``{initializer: array}`` of a multi-task model, from its ONNX file or a bank ``.npz``.

    The ``.npz`` is what :func:`atexport.export.tensorrt.refit_engine` writes beside a refitted engine
    (TensorRT's refitter does not hand back an engine's current weights). Shapes are checked against the
    manifest.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            banks = {k: np.asarray(z[k]) for k in z.files}
    else:
        from atexport.export.swap import read_onnx

        banks = _banks(read_onnx(path), meta, where)
    problems = []
    for name, e in meta.manifest.items():
        init = e.get("initializer", name)
        if init not in banks:
            problems.append(f"{init} missing")
        elif list(banks[init].shape) != list(e["shape"]):
            problems.append(f"{init} has shape {list(banks[init].shape)}, the manifest {e['shape']}")
    if problems:
        raise BadInputError(f"{path} does not hold the bank of {where}: " + "; ".join(problems[:4]) + ".")
    return {e.get("initializer", n): banks[e.get("initializer", n)] for n, e in meta.manifest.items()}


def refit_banks(meta, banks: Mapping[str, np.ndarray], ckpt, task: str | None = None,
                where: str = "the engine") -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every bank tensor with one task's slice replaced by ``ckpt``'s: what a TensorRT refit sets.

    A refit cannot change a tensor's shape, so the task must already be in the model (to add one, use
    ``atexport tasks add`` on the ONNX model and rebuild the engine) and its head must fit the model's
    ``max_classes``; the checkpoint is checked like :func:`add_task` checks it.

    Args:
        meta: the multi-task model's metadata (the engine sidecar's).
        banks: the current bank tensors (:func:`read_banks`); not modified.
        ckpt: the task's new checkpoint (loaded :class:`~atexport.checkpoint.Checkpoint`).
        task: the task to replace; default the checkpoint's task name (file stem, folder of ``run.pt``).
        where: how the model is named in messages.

    Returns:
        ``(banks, tasks)``: new float32 arrays by initializer name, and ``meta.tasks`` with the task's entry
        (class count, class names, fingerprint, source) replaced; its index is kept.

    Raises:
        BadInputError: a task not in the model, or an INT8 model.
        IncompatibleCheckpointError: the checkpoint does not fit (every reason listed).
    """
    name = str(task or default_task_name(ckpt))
    by_name = {t["name"]: t for t in meta.tasks or []}
    if name not in by_name:
        raise BadInputError(
            f"{where} has no task {name!r} (its tasks: {', '.join(sorted(by_name))}); a refit keeps the bank's shape, "
            "so it can only replace a task: name one with --task-name, or add the task to the ONNX model with "
            "'atexport tasks add' and rebuild the engine."
        )
    if meta.precision == "int8":
        raise BadInputError(
            f"{where} is built from an INT8 model, whose calibration ranges were measured with its tasks' adapters; "
            "replace the task in the FP32 ONNX model ('atexport tasks add --replace'), quantize it again and rebuild."
        )
    check_task_fits(meta, ckpt, where)
    slices = task_slices(meta.manifest, ckpt.state_dict, f"checkpoint {_label(ckpt)}")
    idx = int(by_name[name]["index"])
    out = {}
    for key, e in meta.manifest.items():
        init = e.get("initializer", key)
        a = np.array(banks[init], dtype=np.float32, copy=True)
        a[idx] = slices[key]
        out[init] = a
    tasks = [_task_entry(ckpt, name, idx) if t["name"] == name else dict(t) for t in meta.tasks]
    return out, tasks


def _refuse_int8(meta, where):
    if meta.precision == "int8":
        raise BadInputError(
            f"{where} is an INT8 model, whose calibration ranges were measured with its tasks' adapters; edit the "
            "FP32 model ('atexport tasks add/remove' on it) and quantize it again."
        )
