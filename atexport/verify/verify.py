"""``atexport verify``: every artifact and the PyTorch FP32 model over the same labelled images.

:func:`verify` rebuilds the PyTorch model from the checkpoint, loads the data set split, and streams
its images through the reference (PyTorch on timm's own eval transform) and through every artifact
(ONNX Runtime or TensorRT on the torch-free :class:`~atexport.runtime.preprocess.Preprocessor`, what
an app runs). Per backend and precision it reports top-1 accuracy, top-1 agreement with PyTorch, max
and mean absolute logit difference, cosine similarity and images/s, and checks the logits against the
tolerances of the artifact's precision (``export_configs/tolerances.yaml``, overridable). The torch-free
preprocessing itself is checked against timm's transform on the same images. With ``per_block=True``
every ONNX artifact is also compared block by block (:mod:`atexport.verify.per_block`), naming where
its error jumps. Multi-task models are verified per task and on mixed-task batches
(:mod:`atexport.verify.multitask`).

A failing artifact is a :class:`~atexport.errors.ParityError` (``VerifyResult.require_passed``) naming
the backend and by how much, never a warning.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from atexport.errors import BadInputError, ParityError
from atexport.artifact.fit import check_exported_from
from atexport.parity.compare import compare
from atexport.parity.tolerances import resolve_tolerances  # noqa: F401 - part of verify's API
from atexport.utils.progress import Progress
from atexport.runtime.artifacts import Artifact, artifacts, read_artifact
from atexport.verify.common import BackendResult, check_precision_and_preprocess, name_artifacts, run_logits


@dataclass
class VerifyResult:
    """Everything :func:`verify` measured; ``require_passed`` turns failures into a ParityError."""

    checkpoint: str
    dataset: str
    split: str
    samples: int
    batch_size: int
    reference: BackendResult
    backends: list[BackendResult] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)
    per_block: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerances: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    reports: dict = field(default_factory=dict)
    probes: list = field(default_factory=list)  # family diagnostics (verify/probes.py), e.g. Adapter-X routing

    @property
    def passed(self) -> bool:
        return (all(b.passed for b in self.backends) and self.preprocess.get("passed", True)
                and all(p.get("passed", True) for p in self.probes))

    def headline(self) -> str:
        """The line the CLI prints above the table."""
        return f"{self.dataset} {self.split}: {self.samples} images, checkpoint {self.checkpoint}"

    def failures(self) -> list[str]:
        """One line per failure: which backend, which file, by how much."""
        out = []
        if not self.preprocess.get("passed", True):
            out.append(
                f"preprocessing: the torch-free preprocessing differs from timm's eval transform by "
                f"{self.preprocess['max_abs']:.3g} (tolerance {self.preprocess['tolerance']:g})"
            )
        for b in self.backends:
            if not b.passed:
                out.append(f"{b.name} ({b.path}): " + "; ".join(b.parity.failures))
        out += [f"{p['title']} ({p['name']}, {p['artifact']}): {p['summary']}" for p in self.probes if not p.get("passed", True)]
        return out

    def table(self) -> str:
        """The terminal table."""
        head = (f"{'backend':<26} {'n':>5} {'top-1':>7} {'agree':>7} {'max abs':>9} {'mean abs':>9} "
                f"{'min cos':>9} {'img/s':>8}  result")
        lines = [head, "-" * len(head)]
        for b in [self.reference, *self.backends]:
            p = b.parity
            cells = (f"{p.max_abs:>9.3g} {p.mean_abs:>9.3g} {p.min_cosine:>9.6f}" if p
                     else f"{'-':>9} {'-':>9} {'-':>9}")
            verdict = "reference" if p is None else ("ok" if p.passed else "FAIL: " + "; ".join(p.failures))
            lines.append(f"{b.name:<26} {b.samples:>5} {b.accuracy:>7.2%} {b.agreement:>7.1%} {cells} "
                         f"{b.images_per_s:>8.1f}  {verdict}")
        pp = self.preprocess
        if pp:
            lines.append(
                f"preprocessing (numpy/Pillow vs timm): max abs {pp['max_abs']:.3g} on {pp['images']} images, "
                f"tolerance {pp['tolerance']:g}: {'ok' if pp['passed'] else 'FAIL'}"
            )
        from atexport.verify.probes import probe_lines

        lines += probe_lines(self.probes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "split": self.split,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "passed": self.passed,
            "failures": self.failures(),
            "reference": self.reference.to_dict(),
            "backends": [b.to_dict() for b in self.backends],
            "preprocess": self.preprocess,
            "per_block": [r.to_dict() for r in self.per_block],
            "probes": self.probes,
            "notes": self.notes,
            "tolerances": self.tolerances,
            "machine": self.machine,
            "seconds": self.seconds,
        }

    def require_passed(self) -> None:
        """Raise :class:`ParityError` naming every failing backend and by how much."""
        if self.passed:
            return
        lines = ["verification failed:"] + [f"  {f}" for f in self.failures()]
        for r in self.per_block:
            if r.first_over or any(b.path == r.artifact and not b.passed for b in self.backends):
                lines.append(f"  per block: {r.summary()}")
        if self.reports:
            lines.append("  report: " + ", ".join(str(p) for p in self.reports.values()))
        err = ParityError("\n".join(lines))
        err.result = self
        raise err


# --------------------------------------------------------------------------------------------------
# Tolerances


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["int8.min_cosine=0.99", ...]`` -> dict (CLI ``--tol``)."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--tol {item}: expected KEY=VALUE, e.g. --tol int8.min_cosine=0.99.")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------------------------------
# Artifacts -> runners


def _many(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


# How a backend is named in a sentence to the user.
_ENGINE_NAMES = {"openvino": "OpenVINO", "litert": "LiteRT", "executorch": "ExecuTorch"}


def verify(
    ckpt,
    artifacts_: Sequence[Artifact] | None = None,
    *,
    onnx=None,
    onnx_fp16=None,
    onnx_int8=None,
    engine=None,
    openvino=None,
    openvino_precision: str | None = None,
    dataset: str | Sequence[str] = "digits",
    split: str = "test",
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    tolerances: str | os.PathLike | Mapping = "tolerances",
    overrides: Mapping[str, Any] | None = None,
    per_block: bool = False,
    per_block_images: int = 8,
    report: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    seed: int = 0,
    mixed_images: int = 64,
    strict: bool = True,
    log=None,
    progress: bool = True,
):
    """Verify exported artifacts against their checkpoint's PyTorch model on a labelled data set.

    Multi-task models (``atexport onnx --ckpt A --ckpt B --multitask``) are verified task by task, each
    against its own checkpoint, then on mixed-task batches: see
    :func:`atexport.verify.multitask.verify_multitask`, which this calls when the artifacts are multi-task
    models and returns its :class:`~atexport.verify.multitask.MultiTaskVerifyResult`.

    Args:
        ckpt: the checkpoint (``run.pt`` path or loaded) the artifacts were made from; for multi-task
            models, a list: one checkpoint per task to verify (any subset of the model's tasks).
        artifacts_: artifacts as :class:`Artifact` objects; or give them with ``onnx``, ``onnx_fp16``,
            ``onnx_int8``, ``engine`` (paths or lists of paths).
        openvino: IRs or ONNX files to run in OpenVINO (paths or lists of paths), each row labelled with the
            precision that ran and held to that precision's tolerances (``int8+bf16``: ``int8``'s).
        openvino_precision: the OpenVINO precision (``fp32``, ``bf16``, ``fp16``, ``int8``, ``int8+bf16``;
            default: each file's own).
        dataset: a data set name (``digits``, ``pets``, ...) or ``imagefolder:PATH``; for multi-task
            models one for all tasks, or a list with one per checkpoint, in order.
        split: ``train``, ``val`` or ``test``.
        limit: verify on a seeded random ``limit`` images of the split (default: all).
        data_dir: root of downloaded data sets.
        batch_size: images per inference call (a fixed-batch artifact uses its own).
        tolerances: tolerance table (name in ``export_configs/``, YAML path or dict).
        overrides: tolerance overrides, e.g. ``{"int8.min_cosine": 0.99}``.
        per_block: also compare every block of each ONNX artifact with PyTorch (single-task models).
        per_block_images: images used for the per-block comparison.
        report: folder to write ``verify.json`` and ``verify.md`` to.
        backbone_weights: local backbone weights for the checkpoint.
        threads: threads of ONNX Runtime and PyTorch (default: each library's own).
        providers: ONNX Runtime execution providers.
        seed: seed of the ``limit`` subset.
        mixed_images: multi-task models: images per task in the mixed-task batch check.
        strict: raise :class:`ParityError` when an artifact is outside tolerance (after the report is
            written); ``False`` returns the result for the caller to inspect.
        log: optional callable receiving progress lines.
    """
    from atexport.utils.machine import describe_machine
    from atexport.checkpoint import Checkpoint, build_model, load_checkpoint
    from atexport.data import eval_transform, load_dataset, seeded_subset
    from atexport.runtime.preprocess import Preprocessor
    from atexport.runtime.torch import TorchRunner

    say = log or (lambda *_: None)
    t_start = time.perf_counter()
    items = list(artifacts_ or []) + artifacts(onnx, onnx_fp16, onnx_int8, engine, openvino, openvino_precision)
    if not items:
        raise BadInputError("nothing to verify: give at least one of --onnx, --onnx-fp16, --onnx-int8, --engine, "
                            "--openvino.")
    if openvino_precision is not None and not openvino:
        raise BadInputError(f"--openvino-precision {openvino_precision}: give the models to run in OpenVINO "
                            "with --openvino.")
    if int(batch_size) < 1:
        raise BadInputError(f"--batch-size {batch_size}: must be at least 1.")
    if limit is not None and int(limit) < 1:
        raise BadInputError(f"--limit {limit}: must be at least 1.")
    ckpts, datasets = _many(ckpt), _many(dataset)
    if not ckpts:
        raise BadInputError("give the checkpoint the artifacts were made from (--ckpt).")
    if not datasets:
        raise BadInputError("give a data set (--dataset).")
    tol = resolve_tolerances(tolerances, overrides)
    if report is not None:
        from atexport.utils.io import check_writable

        check_writable(Path(report) / "verify.json", "--report")
    loaded = [read_artifact(a, threads, providers) for a in items]
    multi = [i for i in loaded if i.meta.tasks]
    if multi:
        if len(multi) != len(loaded):
            single = [f"{i.artifact.flag} {i.artifact.path}" for i in loaded if not i.meta.tasks]
            raise BadInputError(
                f"{', '.join(single)} {'is a single-task model' if len(single) == 1 else 'are single-task models'} and "
                f"{multi[0].artifact.path} a multi-task one; verify them in separate runs."
            )
        from atexport.verify.multitask import verify_multitask

        return verify_multitask(
            ckpts, loaded, datasets=datasets, split=split, limit=limit, data_dir=data_dir, batch_size=int(batch_size),
            tol=tol, per_block=per_block, report=report, backbone_weights=backbone_weights, threads=threads,
            seed=seed, mixed_images=mixed_images, strict=strict, say=say, t_start=t_start,
        )
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
    ckpt, dataset = ckpts[0], datasets[0]
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    for item in loaded:
        check_exported_from(item.meta, ckpt.task_weights(), f"{item.artifact.flag} {item.artifact.path}")
        check_precision_and_preprocess(item, ckpt, tol)
    name_artifacts(loaded)

    say(f"loading {dataset} ({split}) ...")
    ds = load_dataset(dataset, split, data_dir=data_dir)
    if ds.num_classes != int(ckpt.model.num_classes):
        raise BadInputError(
            f"--dataset {dataset}: {ds.num_classes} classes, but --ckpt {ckpt.path} has {ckpt.model.num_classes}; "
            "verify on the data set the model was trained for."
        )
    ds = seeded_subset(ds, int(limit) if limit else None, seed)
    say(f"building the PyTorch model from {ckpt.path} ...")
    model = build_model(ckpt, backbone_weights=backbone_weights)
    timm_tf = eval_transform(ckpt.preprocess)
    pre = Preprocessor(ckpt.preprocess)
    reference = TorchRunner(model, name="pytorch")
    runners = [reference] + [i.runner for i in loaded]
    import torch

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))  # the same thread count for PyTorch and ONNX Runtime
    for r in runners:
        r.activate()  # fails here, before any work, when a backend is missing (e.g. TensorRT)
    try:
        n = len(ds)
        bs = int(batch_size)
        labels = np.asarray(ds.targets, dtype=np.int64)
        ref_logits, pt_time = [], 0.0
        outs = {id(i): [] for i in loaded}
        spent = {id(i): 0.0 for i in loaded}
        pre_max, first_x = 0.0, None
        chunk = max(bs, *[i.batch or 0 for i in loaded])
        say(f"running {n} images through PyTorch and {len(loaded)} artifact(s) ...")
        bar = Progress(-(-n // chunk), "verify", enabled=progress, log=say, unit="batch", every_s=10.0)
        for start in range(0, n, chunk):
            bar.update(1, postfix=f"{min(start + chunk, n)}/{n} images")
            imgs = [ds.load(k) for k in range(start, min(start + chunk, n))]
            x_pt = np.stack([timm_tf(im).numpy() for im in imgs]).astype(np.float32)
            x_rt = pre(imgs)
            pre_max = max(pre_max, float(np.abs(x_pt - x_rt).max()))
            if first_x is None:
                first_x = x_rt
                # warm-up, untimed: first calls allocate, pick kernels, build ORT's caches
                reference.infer(x_pt[: min(bs, len(x_pt))])
                for i in loaded:
                    run_logits(i.runner, x_rt[: (i.batch or min(bs, len(x_rt)))], i.batch or bs, i.pads)
            y, t = run_logits(reference, x_pt, bs, False)
            ref_logits.append(y)
            pt_time += t
            for i in loaded:
                b = i.batch if i.batch and (i.pads or i.batch < bs) else bs
                y, t = run_logits(i.runner, x_rt, b, i.pads)
                outs[id(i)].append(y)
                spent[id(i)] += t
        bar.close()
        ref = np.concatenate(ref_logits)
        ref_res = BackendResult("pytorch fp32 (reference)", "pytorch", "fp32", None, n,
                                float((ref.argmax(1) == labels).mean()), n / max(pt_time, 1e-9), pt_time)
        result = VerifyResult(
            checkpoint=str(ckpt.path), dataset=str(dataset), split=split, samples=n, batch_size=bs,
            reference=ref_res, tolerances=tol.to_dict(), machine=describe_machine(),
        )
        result.preprocess = {"max_abs": pre_max, "tolerance": tol.preprocess_max_abs, "images": n,
                             "passed": bool(pre_max <= tol.preprocess_max_abs)}
        for i in loaded:
            y = np.concatenate(outs[id(i)])
            parity = compare(ref, y, tol.logits[i.tolerance], name=i.name)
            result.backends.append(BackendResult(
                i.name, i.backend, i.precision, str(i.artifact.path), n, float((y.argmax(1) == labels).mean()),
                n / max(spent[id(i)], 1e-9), spent[id(i)], parity))
        result.seconds["run"] = time.perf_counter() - t_start
        if per_block:
            from atexport.verify.per_block import compare_blocks

            sample = first_x[: max(1, int(per_block_images))]
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
                pb = compare_blocks(model, i.artifact.path, sample, precision=i.precision,
                                    tolerance=tol.per_block.get(i.precision), tolerances=tolerances
                                    if not isinstance(tolerances, Mapping) else dict(tolerances),
                                    name=str(i.artifact.path), threads=threads)
                result.per_block.append(pb)
            result.seconds["per_block"] = time.perf_counter() - t_start - result.seconds["run"]
        from atexport.verify.probes import check_probes  # the family's diagnostics (Adapter-X: routing)

        result.probes = check_probes(ckpt.adapter, model, loaded, first_x, threads)
    finally:
        torch.set_num_threads(prev_threads)
        for r in runners:
            r.deactivate()
    result.seconds["total"] = time.perf_counter() - t_start
    if report is not None:
        from atexport.verify.report import write_verify_report

        result.reports = write_verify_report(result, report)
    if strict:
        result.require_passed()
    return result
