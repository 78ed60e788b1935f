"""``atexport verify``: every artifact and the PyTorch FP32 model over the same labelled images.

:func:`verify` rebuilds the PyTorch model from the checkpoint, loads the data set split, and streams
its images through the reference (PyTorch on timm's own eval transform) and through every artifact
(ONNX Runtime or TensorRT on the torch-free :class:`~atexport.runtime.preprocess.Preprocessor`, what
an app runs). Per backend and precision it reports top-1 accuracy, top-1 agreement with PyTorch, max
and mean absolute logit difference, cosine similarity and images/s, and checks the logits against the
tolerances of the artifact's precision (``export_configs/tolerances.yaml``, overridable). The torch-free
preprocessing itself is checked against timm's transform on the same images. How it runs (data set,
batch, tolerances, extra checks) is one :class:`~atexport.verify.settings.VerifySettings`. With
``per_block=True`` every ONNX artifact is also compared block by block (:mod:`atexport.verify.per_block`),
naming where its error jumps. Multi-task models are verified per task and on mixed-task batches
(:mod:`atexport.verify.multitask`).

A failing artifact is a :class:`~atexport.errors.ParityError` (``VerifyResult.require_passed``) naming
the backend and by how much, never a warning.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from atexport.artifact.fit import check_exported_from
from atexport.errors import BadInputError
from atexport.parity.tolerances import Tolerances, resolve_tolerances
from atexport.runtime.artifacts import Artifact, LoadedArtifact, artifacts, read_artifact
from atexport.utils.progress import Progress
from atexport.verify.common import (activated, backend_row, check_precision_and_preprocess, chunk_size, finish,
                                    label_accuracy, name_artifacts, preprocess_check, reference_row, run_pass)
from atexport.verify.result import BackendResult, VerifyResult
from atexport.verify.settings import VerifySettings

__all__ = ["Artifact", "BackendResult", "VerifyResult", "VerifySettings", "parse_overrides", "resolve_tolerances",
           "verify"]


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["int8.min_cosine=0.99", ...]`` -> dict (CLI ``--tol``)."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--tol {item}: expected KEY=VALUE, e.g. --tol int8.min_cosine=0.99.")
        out[key.strip()] = value.strip()
    return out


def _many(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


# How a backend is named in a sentence to the user.
_ENGINE_NAMES = {"openvino": "OpenVINO", "litert": "LiteRT", "executorch": "ExecuTorch"}


def verify(ckpt, artifacts_: Sequence[Artifact] | None = None, *, onnx=None, onnx_fp16=None, onnx_int8=None,
           engine=None, openvino=None, settings: VerifySettings | None = None, strict: bool = True, log=None):
    """Verify exported artifacts against their checkpoint's PyTorch model on a labelled data set.

    Multi-task models (``atexport onnx --ckpt A --ckpt B --multitask``) are verified task by task, each
    against its own checkpoint, then on mixed-task batches: see
    :func:`atexport.verify.multitask.verify_multitask`, which this calls when the artifacts are multi-task
    models and returns its :class:`~atexport.verify.result.MultiTaskVerifyResult`.

    Example::

        verify("run.pt", onnx="model.onnx", onnx_int8="model.int8.onnx",
               settings=VerifySettings(dataset="digits", limit=200, report="reports/"))

    Args:
        ckpt: the checkpoint (``run.pt`` path or loaded) the artifacts were made from; for multi-task
            models, a list: one checkpoint per task to verify (any subset of the model's tasks).
        artifacts_: artifacts as :class:`Artifact` objects; or give them with ``onnx``, ``onnx_fp16``,
            ``onnx_int8``, ``engine`` (paths or lists of paths).
        openvino: IRs or ONNX files to run in OpenVINO (paths or lists of paths), each row labelled with the
            precision that ran (``settings.openvino_precision``, default each file's own) and held to that
            precision's tolerances (``int8+bf16``: ``int8``'s).
        settings: the data set, batch, tolerances and extra checks (:class:`VerifySettings`; default: its
            defaults, the CLI's).
        strict: raise :class:`~atexport.errors.ParityError` when an artifact is outside tolerance (after the
            report is written); ``False`` returns the result for the caller to inspect.
        log: optional callable receiving progress lines.
    """
    s = settings or VerifySettings()
    say = log or (lambda *_: None)
    t_start = time.perf_counter()
    items = list(artifacts_ or []) + artifacts(onnx, onnx_fp16, onnx_int8, engine, openvino, s.openvino_precision)
    ckpts = _check_inputs(items, _many(ckpt), bool(openvino), s)
    tol = resolve_tolerances(s.tolerances, s.overrides)
    if s.report is not None:
        from atexport.utils.io import check_writable

        check_writable(Path(s.report) / "verify.json", "--report")
    loaded = [read_artifact(a, s.threads, s.providers) for a in items]
    if any(i.meta.tasks for i in loaded):
        _require_all_multitask(loaded)
        from atexport.verify.multitask import verify_multitask

        return verify_multitask(ckpts, loaded, s, tol=tol, strict=strict, log=say, t_start=t_start)
    return _verify_single(_one_checkpoint(ckpts, s.datasets), loaded, s, tol, strict, say, t_start)


def _check_inputs(items: list[Artifact], ckpts: list, openvino: bool, s: VerifySettings) -> list:
    """Refuse a run with nothing to verify, no checkpoint, or an OpenVINO precision without OpenVINO models."""
    if not items:
        raise BadInputError("nothing to verify: give at least one of --onnx, --onnx-fp16, --onnx-int8, --engine, "
                            "--openvino.")
    if s.openvino_precision is not None and not openvino:
        raise BadInputError(f"--openvino-precision {s.openvino_precision}: give the models to run in OpenVINO "
                            "with --openvino.")
    if not ckpts:
        raise BadInputError("give the checkpoint the artifacts were made from (--ckpt).")
    return ckpts


def _require_all_multitask(loaded: Sequence[LoadedArtifact]) -> None:
    """Multi-task and single-task models are verified in separate runs."""
    multi = [i for i in loaded if i.meta.tasks]
    if len(multi) != len(loaded):
        single = [f"{i.artifact.flag} {i.artifact.path}" for i in loaded if not i.meta.tasks]
        raise BadInputError(
            f"{', '.join(single)} {'is a single-task model' if len(single) == 1 else 'are single-task models'} and "
            f"{multi[0].artifact.path} a multi-task one; verify them in separate runs."
        )


def _one_checkpoint(ckpts: list, datasets: list[str]):
    """The one checkpoint of single-task models, refusing several checkpoints or data sets."""
    if len(ckpts) != 1:
        raise BadInputError(
            f"{len(ckpts)} checkpoints (--ckpt) for single-task models; several are for multi-task models "
            "(one per task). Verify each single-task model against the one checkpoint it was made from."
        )
    if len(datasets) != 1:
        raise BadInputError(
            f"{len(datasets)} data sets (--dataset) for one checkpoint; give one (several are for multi-task "
            "models, one per --ckpt)."
        )
    return ckpts[0]


# --------------------------------------------------------------------------------------------------
# Single-task models


def _verify_single(ckpt, loaded: list[LoadedArtifact], s: VerifySettings, tol: Tolerances, strict: bool, say,
                   t_start: float) -> VerifyResult:
    """Every single-task artifact and the checkpoint's PyTorch model over the data set; then per block, probes."""
    from atexport.checkpoint import Checkpoint, build_model, load_checkpoint
    from atexport.runtime.torch import TorchRunner
    from atexport.utils.machine import describe_machine
    from atexport.verify.probes import check_probes  # the family's diagnostics (Adapter-X: routing)

    ckpt = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    for item in loaded:
        check_exported_from(item.meta, ckpt.task_weights(), f"{item.artifact.flag} {item.artifact.path}")
        check_precision_and_preprocess(item, ckpt, tol)
    name_artifacts(loaded)
    ds = _load_data(ckpt, s, say)
    say(f"building the PyTorch model from {ckpt.path} ...")
    model = build_model(ckpt, backbone_weights=s.backbone_weights)
    reference = TorchRunner(model, name="pytorch")
    with activated([reference] + [i.runner for i in loaded], s.threads):
        n, chunk = len(ds), chunk_size(loaded, s.batch_size)
        say(f"running {n} images through PyTorch and {len(loaded)} artifact(s) ...")
        bar = Progress(-(-n // chunk), "verify", enabled=s.progress, log=say, unit="batch", every_s=10.0)
        p = run_pass(ds, ckpt.preprocess, reference, loaded, s.batch_size, keep=chunk, bar=bar)
        bar.close()
        accuracy = label_accuracy(ds.targets)
        result = VerifyResult(
            checkpoint=str(ckpt.path), dataset=s.datasets[0], split=s.split, samples=n, batch_size=int(s.batch_size),
            reference=reference_row(p, accuracy), backends=[backend_row(p, i, tol, accuracy) for i in loaded],
            preprocess=preprocess_check(p, tol), tolerances=tol.to_dict(), machine=describe_machine(),
        )
        result.seconds["run"] = time.perf_counter() - t_start
        if s.per_block:
            _per_block(result, model, loaded, p.kept, s, tol, say)
            result.seconds["per_block"] = time.perf_counter() - t_start - result.seconds["run"]
        result.probes = check_probes(ckpt.adapter, model, loaded, p.kept, s.threads)
    return finish(result, s, strict, t_start)


def _load_data(ckpt, s: VerifySettings, say):
    """The data set's split (its seeded ``limit`` subset), refusing one with other classes than the model."""
    from atexport.data import load_dataset, seeded_subset

    dataset = s.datasets[0]
    say(f"loading {dataset} ({s.split}) ...")
    ds = load_dataset(dataset, s.split, data_dir=s.data_dir)
    if ds.num_classes != int(ckpt.model.num_classes):
        raise BadInputError(
            f"--dataset {dataset}: {ds.num_classes} classes, but --ckpt {ckpt.path} has {ckpt.model.num_classes}; "
            "verify on the data set the model was trained for."
        )
    return seeded_subset(ds, int(s.limit) if s.limit else None, s.seed)


def _per_block(result: VerifyResult, model, loaded, first_x, s: VerifySettings, tol: Tolerances, say) -> None:
    """Every ONNX Runtime artifact block by block against PyTorch on the first images; a note for the others."""
    from atexport.verify.per_block import compare_blocks

    sample = first_x[: max(1, int(s.per_block_images))]
    for i in loaded:
        if i.backend != "onnxruntime":
            src = i.artifact.path
            result.notes.append(
                f"per-block: {src} is a TensorRT engine, whose intermediate tensors are not exposed; run "
                "--per-block on the ONNX model it was built from (its sidecar's onnx.path)."
                if i.backend == "tensorrt" else f"per-block: {src} runs in "
                f"{_ENGINE_NAMES.get(i.backend, i.backend)}, which is not compared block by block; run "
                "--per-block on the ONNX model in ONNX Runtime (--onnx)."
            )
            continue
        say(f"comparing {i.artifact.path} block by block ...")
        result.per_block.append(compare_blocks(
            model, i.artifact.path, sample, precision=i.precision, tolerance=tol.per_block.get(i.precision),
            tolerances=s.per_block_tolerances, name=str(i.artifact.path), threads=s.threads))
