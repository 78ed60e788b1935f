"""The one answer to "does this task fit this model?", used by swap, tasks add, the runtime, verify and bench.

A task (:class:`~atexport.artifact.tasks.TaskWeights`: tensors plus the record of what they were trained
for) fits a model when everything baked into the model's graph is the same as what the task was trained
with: the backbone (name, architecture overrides, fingerprint of its weights), the regime, the adapter
family and every structural adapter setting (rank, placement, scale...), the preprocessing, and the
classes (equal for a separable model, at most the logits width of a multi-task model); then its tensors
must be exactly the model's swappable tensors, shape for shape. Every reason is listed in one
:class:`~atexport.errors.IncompatibleCheckpointError`. Two tasks that must share one multi-task model
are compared with the same rules (:func:`check_same_family`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from atexport.artifact.bank import REGIMES, task_slices
from atexport.artifact.tasks import NP_DTYPES, TaskWeights, as_numpy
from atexport.errors import IncompatibleCheckpointError
from atexport.utils.io import canonical_json

# Adapter settings that do not change the graph: how it was initialised for training, and which family's
# trained adapters were materialised into AdapterTune's export layout (AdaRing: same tensors, same graph
# for the same rank, placement and alpha; zero-padded ranks add exactly 0), so such tasks fit each other.
_TRAINING_ONLY = ("init", "materialised_from", "balance")

# kind -> keys that adapter records (checkpoints, artifact metadata) written before the key existed lack, and
# the value they were trained with: Adapter-X records without ``layout`` are its layout 1 (CLS frozen).
_RECORD_DEFAULTS = {"adapterx": {"layout": 1, "train_cls": False}}


def record_with_defaults(d: Mapping[str, Any]) -> dict:
    """An adapter record with the keys it predates filled in as trained (see ``_RECORD_DEFAULTS``)."""
    kind = d.get("kind")
    defaults = _RECORD_DEFAULTS.get(kind, {}) if isinstance(kind, str) else {}
    missing = {k: v for k, v in defaults.items() if k not in d}
    return {**d, **missing}


def family(info: Mapping[str, Any]) -> dict:
    """What must be equal between a task and a model (or two tasks), from a task or metadata record.

    Only what the record holds is returned (an ``.npz`` without a record is checked on its tensors alone).
    """
    out: dict[str, Any] = {}
    bb = info.get("backbone") or {}
    if bb.get("name"):
        out["backbone"] = bb["name"]
    if "model_args" in bb:
        out["backbone overrides"] = bb.get("model_args") or {}
    if bb.get("fingerprint"):
        out["backbone fingerprint"] = bb["fingerprint"]
    if info.get("regime"):
        out["regime"] = info["regime"]
    if "adapter" in info:
        ad = info.get("adapter")
        if ad is not None:  # keys the record predates, as trained (Adapter-X records without layout: 1)
            ad = {k: v for k, v in record_with_defaults(ad).items() if k not in _TRAINING_ONLY}
        out["adapter"] = ad
    if info.get("preprocess"):
        out["preprocessing"] = info["preprocess"]
    return out


def _meta_record(meta) -> dict:
    return {"backbone": meta.backbone, "regime": meta.regime, "adapter": meta.adapter, "preprocess": meta.preprocess}


def _differences(mine: Mapping, theirs: Mapping, theirs_label: str) -> list[str]:
    reasons = []
    for key, value in mine.items():
        if key not in theirs or canonical_json(value) == canonical_json(theirs[key]):
            continue
        other = theirs[key]
        if key == "backbone fingerprint":
            reasons.append(f"backbone fingerprint {str(value)[:12]} != {theirs_label} {str(other)[:12]} "
                           "(adapters trained on another backbone)")
        elif key == "preprocessing":
            reasons.append(f"preprocessing differs from {theirs_label}")
        elif key == "adapter":
            if (value is None) != (other is None):
                mine_kind = "none" if value is None else value.get("kind", "adaptertune")
                their_kind = "none" if other is None else other.get("kind", "adaptertune")
                reasons.append(f"adapters {mine_kind} != {theirs_label} {their_kind}")
            else:
                for k in sorted(set(value) | set(other)):
                    if canonical_json(value.get(k)) != canonical_json(other.get(k)):
                        note = " (baked into the graph)" if k == "alpha" else ""
                        label = {"every": "placement every=", "alpha": "scale alpha="}.get(k, f"{k} ")
                        reasons.append(f"adapter {label}{value.get(k)} != {theirs_label} {other.get(k)}{note}")
        else:
            reasons.append(f"{key} {value!r} != {theirs_label} {other!r}")
    return reasons


def _label(task: TaskWeights, short: bool = False) -> str:
    if not task.source:
        return f"task {task.name!r}"
    return Path(task.source).name if short else str(task.source)


def check_weights(meta, weights: Mapping[str, Any], where: str = "the model") -> dict[str, np.ndarray]:
    """Plain arrays (keyed by checkpoint or initializer name) against a separable model's manifest, cast to
    the manifest's dtypes: ``{initializer: array}``."""
    by_init = {e.get("initializer", n): (n, e) for n, e in meta.manifest.items()}
    out, problems = {}, []
    for key, value in weights.items():
        if key in meta.manifest:
            init, e = meta.manifest[key].get("initializer", key), meta.manifest[key]
        elif key in by_init:
            init, e = key, by_init[key][1]
        else:
            problems.append(f"{key} is not a swappable tensor of {where}")
            continue
        a = as_numpy(value, NP_DTYPES.get(e.get("dtype", "float32"), np.float32))
        if list(a.shape) != list(e["shape"]):
            problems.append(f"{key} has shape {list(a.shape)}, the model needs {e['shape']}")
        elif not np.isfinite(a).all():
            problems.append(f"{key} holds NaN or infinite values (a diverged training run?)")
        out[init] = a
    lacking = [i for i in by_init if i not in out]
    if lacking:
        problems.append(f"missing tensors {lacking[:5]}")
    if problems:
        raise IncompatibleCheckpointError(f"these weights do not fit {where}: " + "; ".join(problems[:6]) + ".")
    return out


def check_fits(meta, task: TaskWeights, where: str = "the model", *, tensors: bool = True) -> dict[str, np.ndarray]:
    """Refuse ``task`` unless it fits the separable or multi-task model ``meta``; return its tensors as the
    model takes them: ``{initializer: array}`` (a multi-task model: this task's slice of each bank tensor).

    Args:
        meta: the model's metadata.
        task: the task (``Checkpoint.task_weights()``, a task ``.npz``...).
        where: how the model is named in messages.
        tensors: ``False`` asks only whether the model was made for this task's family (backbone, regime,
            adapter settings, preprocessing, classes), as verify and bench do for a model and the checkpoint
            it was exported from; the model then need not be separable and nothing is returned.

    Raises:
        IncompatibleCheckpointError: a model without swappable weights, or every reason the task does not fit.
    """
    label = _label(task)
    multitask = bool(meta.tasks)
    if tensors and not multitask and not (meta.separable and meta.manifest):
        raise IncompatibleCheckpointError(
            f"{where} was exported without --separable: its adapter and head weights are fused into the graph, "
            "so no other task can be put in. Re-export it with 'atexport onnx --separable'."
        )
    info = task.info or {}
    if tensors and info.get("regime") == "full":
        raise IncompatibleCheckpointError(
            f"{label}: a full fine-tune changes the backbone itself; only adapter or head tasks can be put into "
            f"{where}."
        )
    reasons = _differences(family(info), family(_meta_record(meta)), "the model's")
    n = info.get("num_classes")
    if multitask:
        cap = int(((meta.extra or {}).get("multitask") or {}).get("max_classes") or meta.output["shape"][-1])
        if n is not None and int(n) > cap:
            reasons.append(
                f"{n} classes > the model's capacity of {cap} (its logits width, fixed at export: re-export with "
                "'atexport onnx --multitask --max-classes N' to serve wider heads)"
            )
    elif n is not None and meta.num_classes is not None and int(n) != int(meta.num_classes):
        reasons.append(f"{n} classes != the model's {meta.num_classes}")
    if reasons:
        raise IncompatibleCheckpointError(f"{label} does not fit {where}: " + "; ".join(reasons) + ".")
    if not tensors:
        return {}
    if multitask:
        bad = [k for k, a in task.arrays.items() if not np.isfinite(as_numpy(a)).all()]
        if bad:
            raise IncompatibleCheckpointError(f"{label}: {bad[:3]} hold NaN or infinite values (a diverged run?).")
        return task_slices(meta.manifest, task.arrays, label)
    return check_weights(meta, task.arrays, f"{where} ({label})")


def check_same_family(tasks: Sequence[TaskWeights]) -> None:
    """Refuse tasks that cannot share one backbone and one bank layout, naming each file.

    Raises:
        IncompatibleCheckpointError: a regime without a shared backbone, or every mismatch with the first task.
    """
    first = tasks[0]
    regime = (first.info or {}).get("regime")
    if regime and regime not in REGIMES:
        raise IncompatibleCheckpointError(
            f"{_label(first, True)}: regime {regime!r} changes the whole backbone, so there is no shared backbone to serve "
            f"several tasks from; multi-task models take {' or '.join(REGIMES)} checkpoints."
        )
    ref = family(first.info or {})
    reasons = []
    for t in tasks[1:]:
        reasons += [f"{_label(t, True)}: {r}" for r in _differences(family(t.info or {}), ref, f"{_label(first, True)}'s")]
    if reasons:
        raise IncompatibleCheckpointError(
            "these tasks cannot share one multi-task model (same backbone, regime, adapter settings and "
            "preprocessing needed): " + "; ".join(reasons[:8]) + "."
        )


def check_exported_from(meta, task: TaskWeights, where: str = "the model") -> None:
    """Refuse a single-task model that was not exported for ``task``'s family (another backbone, regime,
    adapter settings, preprocessing or class count): verify and bench compare a model with its checkpoint.

    Raises:
        BadInputError: a multi-task model (its tasks are matched with :func:`match_tasks`).
        IncompatibleCheckpointError: every difference.
    """
    from atexport.errors import BadInputError

    if meta.tasks:
        raise BadInputError(
            f"{where} is a multi-task model; give the checkpoint of each task to check with --ckpt (repeatable), "
            "and for 'atexport bench' the task with --task NAME or --mixed."
        )
    check_fits(meta, task, where, tensors=False)


def _holds(meta) -> str:
    return ", ".join(f"{t['name']} ({t.get('source') or '?'}, {t['num_classes']} classes)"
                     for t in sorted(meta.tasks, key=lambda t: t["index"]))


def match_tasks(meta, tasks: Sequence[TaskWeights], where: str = "the model") -> list[dict]:
    """The task of a multi-task model that each given task is, in order.

    A task is matched by its weights fingerprint (:func:`~atexport.artifact.bank.task_fingerprint`, recorded
    per task at export or ``atexport tasks add``); by name only where the model records no fingerprint.

    Raises:
        IncompatibleCheckpointError: another family (backbone...); a task the model was not made from (the
            tasks it holds are listed); the same task given twice.
    """
    from atexport.artifact.bank import task_fingerprint

    entries = sorted(meta.tasks, key=lambda t: t["index"])
    out, taken = [], {}
    for task in tasks:
        check_fits(meta, task, where, tensors=False)
        src = task.source or task.name
        fp = task_fingerprint(task.arrays)
        same = [t for t in entries if t.get("fingerprint") == fp]
        named = [t for t in entries if t["name"] == task.name]
        if same:
            entry = next((t for t in same if t["name"] == task.name), same[0])
        elif named and not named[0].get("fingerprint"):
            entry = named[0]
        elif named:
            raise IncompatibleCheckpointError(
                f"--ckpt {src} is not a task of {where}: its task {task.name!r} was made from other weights (task "
                f"fingerprint {str(named[0]['fingerprint'])[:12]} != the checkpoint's {fp[:12]}). Check against the "
                f"checkpoint the task was made from, or put this one in with 'atexport tasks add --model MODEL "
                f"--ckpt {src} --name {task.name} --replace'."
            )
        else:
            raise IncompatibleCheckpointError(
                f"--ckpt {src} is not a task of {where} (no task has its weights, task fingerprint {fp[:12]}); "
                f"the model holds: {_holds(meta)}."
            )
        if entry["name"] in taken:
            raise IncompatibleCheckpointError(
                f"--ckpt {taken[entry['name']]} and --ckpt {src} are both task {entry['name']!r} of {where}; "
                "give each task's checkpoint once."
            )
        taken[entry["name"]] = src
        out.append(entry)
    return out
