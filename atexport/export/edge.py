"""What the on-device exports (LiteRT, ExecuTorch) share: the model to convert, its metadata, the parity
check against PyTorch, and the verified atomic write of the artifact with its sidecar.

Both formats are converted from the trained PyTorch model rebuilt from a checkpoint (``torch.export``
underneath), at a fixed batch of 1 (what a phone or a board runs; :class:`~atexport.runtime.model.Model`
feeds larger batches one image at a time). A *separable* export converts a wrapper whose adapter and
head tensors are extra positional inputs after the image (``torch.func.functional_call``), so the
artifact holds the frozen backbone and takes the task's tensors with every call: swapping a task is
feeding other arrays, no re-export, and identical tensors (zero-initialised adapters) can never be merged
into one, since inputs are never deduplicated. The input each tensor goes to is recorded in the
metadata (``extra.<format>.weight_inputs``: checkpoint name -> input), beside the manifest.

The artifact is checked against PyTorch on real photos and seeded random inputs (the ``parity`` section
of ``export_configs/onnx.yaml``, the precision's row of ``tolerances.yaml``) and written only when every
row passes: the sidecar (:mod:`atexport.artifact.edge`) first, then the artifact, each atomically; one
that fails is kept at ``<stem>.failed<suffix>`` with its sidecar and a
:class:`~atexport.errors.ParityError` is raised.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atexport.errors import BadInputError

IMAGE_INPUT = "input"
LOGITS_OUTPUT = "logits"


@dataclass
class EdgeResult:
    """What :func:`~atexport.export.litert.export_litert` or :func:`~atexport.export.executorch.export_executorch`
    produced.

    Attributes:
        path: the written artifact (``None`` when parity failed); its sidecar is ``<path>.json``.
        format: ``litert`` or ``executorch``.
        precision: ``fp32`` or ``int8``.
        metadata: the metadata written in the sidecar.
        parity: parity rows against PyTorch (empty when not verified).
        seconds: wall time per step.
        size_bytes: size of the artifact.
        failed_path: where an artifact that failed parity was kept.
    """

    path: Path | None
    format: str
    precision: str
    metadata: Any
    parity: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    size_bytes: int = 0
    failed_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.parity)

    def summary(self) -> str:
        m = self.metadata
        what = (f"{len(m.tasks)} tasks ({', '.join(t['name'] for t in m.tasks)}), task_id input" if m.tasks else
                f"{m.num_classes} classes, task {m.task!r}, {'separable' if m.separable else 'fused'}")
        lines = [f"model:      {m.backbone['name']}, {what}",
                 f"format:     {self.format} {self.precision}, {self.size_bytes / 1e6:.2f} MB, batch 1",
                 "time:       " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())]
        return "\n".join(lines)


@dataclass(frozen=True)
class EdgeOptions:
    """What the on-device exports share besides the model, the output and the precision; made once and
    validated on construction.

    Attributes:
        images: extra real images for parity (a folder or a list of paths or PIL images).
        backbone_weights: local backbone weights file, for backbones not in timm's hub.
        config: the export preset holding the parity settings (``export_configs/``, name or YAML path).
        threads: LiteRT interpreter threads for the parity check and full-integer calibration (LiteRT only).
    """

    images: Any = None
    backbone_weights: Any = None
    config: Any = "onnx"
    threads: int | None = None

    def __post_init__(self):
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise BadInputError(f"--threads {self.threads}: must be a positive integer.")

    def refuse_threads(self, fmt: str) -> None:
        """Refuse ``threads`` for a format whose runtime takes none (ExecuTorch)."""
        if self.threads is not None:
            raise BadInputError(f"--threads applies to LiteRT, not {fmt}; drop it.")


@dataclass
class EdgeModel:
    """The PyTorch side of an on-device export (see :func:`prepare`)."""

    ckpt: Any
    model: Any
    output: Path
    task: str
    names: list[str]
    example: tuple
    par: dict
    images: Any


def prepare(ckpt, output, suffix: str, *, separable: bool, images=None, task_name: str | None = None,
            backbone_weights=None, config="onnx") -> EdgeModel:
    """Load the checkpoint, check the output path, rebuild the trained model and its example inputs.

    Args:
        ckpt: a ``run.pt`` path or a loaded :class:`~atexport.checkpoint.Checkpoint`.
        output: the artifact to write; default ``<checkpoint stem><suffix>`` beside the checkpoint.
        suffix: ``.tflite`` or ``.pte``.
        separable: lift the adapter and head tensors to inputs (see the module docstring).

    Raises:
        BadInputError: unreadable checkpoint, output with another suffix or equal to the checkpoint.
        IncompatibleCheckpointError: fingerprint mismatch; ``separable`` with a full fine-tune.
    """
    from atexport.checkpoint import Checkpoint, build_model, load_checkpoint
    from atexport.export.onnx import load_export_config, swappable_names
    from atexport.utils.io import check_writable

    par = dict(load_export_config(config)["parity"])
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    ckpt = ckpt.for_export()
    if output is None:
        if ckpt.path is None:
            raise BadInputError("give an output path (-o): the checkpoint was not loaded from a file.")
        output = Path(ckpt.path).with_suffix(suffix)
    output = check_writable(output, "-o")
    if output.suffix.lower() != suffix:
        raise BadInputError(f"-o {output}: this artifact is a {suffix} file; give a path ending in {suffix}.")
    if ckpt.path is not None and output.resolve() == Path(ckpt.path).resolve():
        raise BadInputError(f"-o {output}: that is the checkpoint itself; choose another output path.")
    if images is not None:
        from atexport.parity.images import load_images

        images = load_images(images, limit=par.get("max_images"))
    import torch

    model = build_model(ckpt, backbone_weights=backbone_weights).eval()
    names = swappable_names(ckpt, model) if separable else []
    in_shape = [int(v) for v in ckpt.preprocess["input_size"]]
    x = torch.randn((1, *in_shape), generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    weights = tuple(params[n].detach().clone() for n in names)
    return EdgeModel(ckpt=ckpt, model=model, output=output, task=task_name or ckpt.name, names=names,
                     example=(x, *weights), par=par, images=images)


def module_to_convert(em: EdgeModel):
    """The module a converter sees: the model itself, or (separable) ``forward(image, *task_tensors)``."""
    if not em.names:
        return em.model
    import torch

    names = list(em.names)

    class TaskTensorsAsInputs(torch.nn.Module):
        """Runs the model with the task's tensors given as positional inputs after the image."""

        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, *tensors):
            return torch.func.functional_call(self.module, dict(zip(names, tensors)), (x,), strict=False)

    return TaskTensorsAsInputs(em.model).eval()


def edge_metadata(em: EdgeModel, fmt: str, precision: str, record: dict):
    """The atexport metadata of the artifact (fixed batch 1; the manifest when separable)."""
    from atexport.export.onnx import _metadata, build_manifest

    manifest = build_manifest(dict(zip(em.names, em.example[1:]))) if em.names else {}
    extra = {fmt: record, "checkpoint": {"file": Path(em.ckpt.path).name if em.ckpt.path else None,
                                         "metrics": em.ckpt.metrics}, "parity": None}
    meta = _metadata(em.ckpt, input_name=IMAGE_INPUT, output_name=LOGITS_OUTPUT, batch=1, separable=bool(em.names),
                     manifest=manifest, task=em.task, extra=extra)
    meta.precision = precision
    return meta


def check_parity_vs_torch(em: EdgeModel, candidate, precision: str, label: str, say, *, judged=None,
                          judged_name: str = "held-out") -> list:
    """Parity rows of ``candidate`` (an active runner of the artifact) against the PyTorch model.

    ``judged``: preprocessed held-out in-domain images (a calibration set's); when given, their row is
    judged (:func:`~atexport.parity.check_parity`) and the photos and random inputs become smoke rows."""
    from atexport.parity import ParitySettings, check_parity, photo_batch
    from atexport.runtime.torch import TorchRunner

    photos = photo_batch(em.ckpt.preprocess, extra=em.images, max_images=em.par.get("max_images"))
    held = f" and {len(judged)} {judged_name} images" if judged is not None and len(judged) else ""
    say(f"checking {label} parity against PyTorch on {len(photos)} photos{held} ...")
    with TorchRunner(em.model) as ref:
        return check_parity(ref, candidate, photos, precision, judged=judged, judged_name=judged_name, label=label,
                            settings=ParitySettings(
                                random_inputs=int(em.par.get("random_inputs", 8)),
                                seed=int(em.par.get("seed", 0)), batch_sizes=[1],
                                tolerances=em.par.get("tolerances", "tolerances"),
                                input_shape=[int(v) for v in em.ckpt.preprocess["input_size"]]))


def check_runner(em: EdgeModel, runner, precision: str, label: str, say, *, judged=None,
                 judged_name: str = "held-out") -> list:
    """Parity of ``runner`` (the artifact in its runtime, not yet entered) against PyTorch; a separable
    artifact is fed the exported task's tensors, as the runtime feeds them from ``<artifact>.task.npz``."""
    with runner:
        if em.names:
            runner.add_task(weights=dict(zip(em.names, (t.numpy() for t in em.example[1:]))), name="exported")
            runner.use("exported")
        return check_parity_vs_torch(em, runner, precision, label, say, judged=judged, judged_name=judged_name)


def own_task_bytes(em: EdgeModel) -> dict[str, bytes]:
    """A separable artifact's own task, written beside it as ``<artifact>.task.npz`` (its inputs have no
    stored values): ``{suffix: bytes}`` for :func:`write_edge`; empty for a fused model."""
    if not em.names:
        return {}
    from atexport.artifact.tasks import task_npz_bytes

    task = em.ckpt.task_weights(em.task)
    task.arrays = {n: task.arrays[n] for n in em.names}
    return {".task.npz": task_npz_bytes(task)}


def write_edge(data: bytes, result: EdgeResult, output: Path, *, verify: bool, t_start: float,
               extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the files beside the artifact (``extra_files``: ``{suffix after the artifact's name: bytes}``),
    its sidecar, then the artifact, each atomically; a failing artifact goes to ``.failed`` with its files."""
    from atexport.artifact.edge import edge_sidecar, edge_sidecar_path
    from atexport.artifact.onnx import failed_path_for
    from atexport.export.write import write_verified
    from atexport.utils.io import atomic_write_bytes, atomic_write_json

    meta = result.metadata
    if verify:
        meta.extra["parity"] = [r.to_dict() for r in result.parity]
    result.seconds["total"] = time.perf_counter() - t_start
    result.size_bytes = len(data)
    failed = Path(failed_path_for(output))
    passed = not verify or result.passed
    target = output if passed else failed
    sha = hashlib.sha256(data).hexdigest()
    for suffix, blob in (extra_files or {}).items():
        atomic_write_bytes(target.with_name(target.name + suffix), blob)
    atomic_write_json(edge_sidecar_path(target), edge_sidecar(meta, target.name, result.format, sha))
    what = (f"the {result.format} {result.precision} model does not match PyTorch within the {meta.precision} "
            "tolerances")
    result.path = write_verified(data, output, result.parity, what, verify=verify, failed_path=failed, result=result)
    return result.path


def refuse_precision(precision: str, allowed) -> str:
    p = str(precision).lower()
    if p not in allowed:
        raise BadInputError(f"--precision {precision}: expected one of {', '.join(allowed)}.")
    return p

