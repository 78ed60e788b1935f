"""The atexport checkpoint: a small, weights-only file of what training changed.

``run.pt`` is a plain dict that loads with ``torch.load(..., weights_only=True)``: a format name and
version, the model spec (backbone, architecture overrides, classes), the adapter config, the training
regime, the backbone fingerprint and preprocessing, the trainable tensors only (adapters + head; the
whole state dict for ``full``), final metrics, and the resolved training config. A vit_small rank-16
adapter checkpoint is about 1-2 MB. Files are written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from atexport import __version__
from atexport.adapters import (
    adapter_config_from_dict,
    export_model,
    export_view,
    inject_adapters,
    is_adapter_tensor,
)
from atexport.artifact.tasks import TaskWeights, as_numpy, default_task_name
from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.models import (
    HEAD_PREFIXES,
    ModelSpec,
    backbone_fingerprint,
    create_backbone,
    preprocess_config,
)
from atexport.utils.io import atomic_write_bytes, load_torch_file, require_file

FORMAT = "atexport.checkpoint"
FORMAT_VERSION = 1
REGIMES = ("adapter", "head", "full")


@dataclass
class Checkpoint:
    """In-memory form of ``run.pt``."""

    model: ModelSpec
    adapter: Any  # the family config (AdapterConfig, AdaRingConfig, ...) or None
    regime: str
    fingerprint: str
    state_dict: dict
    preprocess: dict
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    resume: dict | None = None
    atexport_version: str = __version__
    path: Path | None = None

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise IncompatibleCheckpointError(f"unknown training regime {self.regime!r}; expected {REGIMES}.")

    @property
    def name(self) -> str:
        """The task's default name, the same in every command (``runs/cars/run.pt`` -> ``cars``)."""
        return default_task_name(self)

    def task_info(self) -> dict[str, Any]:
        """What the task was trained for: the record every task-fits-model check reads."""
        return {
            "backbone": {"name": self.model.backbone, "fingerprint": self.fingerprint,
                         "model_args": self.model.model_args},
            "adapter": self.adapter.to_dict() if self.adapter else None,
            "regime": self.regime,
            "num_classes": int(self.model.num_classes),
            "class_names": list(self.model.class_names) if self.model.class_names else None,
            "preprocess": self.preprocess,
        }

    def task_weights(self, name: str | None = None) -> TaskWeights:
        """This checkpoint's task as torch-free :class:`~atexport.artifact.tasks.TaskWeights` (float32 numpy
        adapter and head tensors plus :meth:`task_info`): what swap, tasks, the runtime and verify take."""
        arrays = {k: as_numpy(v) for k, v in self.state_dict.items() if is_task_tensor(k)}
        return TaskWeights(name=name or self.name, arrays=arrays, info=self.task_info(),
                           source=str(self.path) if self.path else None)

    def for_export(self) -> Checkpoint:
        """This checkpoint in its adapter family's export layout (itself when that is the trained layout).

        AdaRing's ring cores become AdapterTune's per-layer FP32 matrices (the config records
        ``materialised_from``), so every export stage reads one layout; idempotent.
        """
        cfg, state = export_view(self.adapter, self.state_dict)
        if cfg is self.adapter:
            return self
        return replace(self, adapter=cfg, state_dict=state, resume=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "atexport_version": self.atexport_version,
            "model": self.model.to_dict(),
            "adapter": self.adapter.to_dict() if self.adapter else None,
            "regime": self.regime,
            "backbone": {"fingerprint": self.fingerprint, "source": self.model.source},
            "preprocess": self.preprocess,
            "state_dict": self.state_dict,
            "metrics": self.metrics,
            "config": self.config,
            "resume": self.resume,
        }


def is_task_tensor(name: str) -> bool:
    """Whether a checkpoint tensor belongs to the task (adapters and head), not to the frozen backbone."""
    return is_adapter_tensor(name) or name.startswith("head.")


def export_task_weights(ckpt, output: str | Path | None = None, *, name: str | None = None) -> Path:
    """Write a checkpoint's task (adapter and head tensors plus its record) to a torch-free ``.npz``, atomically.

    Args:
        ckpt: a ``run.pt`` path or a loaded :class:`Checkpoint`.
        output: the ``.npz`` to write; default ``<checkpoint stem>.npz`` beside the checkpoint.
        name: the task's name (default: :func:`~atexport.artifact.tasks.default_task_name`).

    Returns:
        The path written.
    """
    from atexport.artifact.tasks import task_npz_bytes
    from atexport.utils.io import check_writable

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    if ckpt.regime == "full":
        raise IncompatibleCheckpointError(
            f"checkpoint {ckpt.path}: a full fine-tune changes the backbone itself; only adapter or head "
            "checkpoints can be put into a separable model."
        )
    if output is None:
        if ckpt.path is None:
            raise BadInputError("give an output path (-o): the checkpoint was not loaded from a file.")
        output = Path(ckpt.path).with_suffix(".npz")
    output = check_writable(output, "-o")
    if Path(output).suffix != ".npz":
        raise BadInputError(f"-o {output}: task weights are written as NumPy .npz; give a path ending in .npz.")
    return atomic_write_bytes(output, task_npz_bytes(ckpt.task_weights(name)))


def trainable_state(model, regime: str) -> dict:
    """The tensors a checkpoint stores for ``regime`` (detached CPU copies)."""
    sd = model.state_dict()
    if regime == "full":
        keep = sd
    elif regime == "head":
        keep = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
    else:
        keep = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES) or is_adapter_tensor(k)}
    return {k: v.detach().cpu().clone() for k, v in keep.items()}


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically (temp file beside ``path``, then rename)."""
    import torch

    buf = io.BytesIO()
    torch.save(ckpt.to_dict(), buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, flag: str | None = "--ckpt", layout: str = "export") -> Checkpoint:
    """Load and validate an atexport checkpoint; never unpickles code.

    Messages name ``flag`` and the path; ``flag=None`` for a ``run.pt`` found inside a folder the user gave
    (a sweep cell, a report's run): then the path alone, never a flag the user did not type.

    ``layout="export"`` (default) gives the adapter family's export layout (:meth:`Checkpoint.for_export`:
    AdaRing as materialised AdapterTune tensors), what every export, swap, task and verify stage reads;
    ``layout="trained"`` gives the tensors as trained (resuming a run).
    """
    path = require_file(path, flag, "checkpoint")
    where = f"{flag} {path}" if flag else str(path)
    try:
        # never torch's advice to re-run with weights_only=False (running the file's pickled code)
        d = load_torch_file(path, flag, "atexport checkpoint")
    except BadInputError as e:
        raise BadInputError(
            f"{e} It must be a run.pt written by 'atexport train' (or converted with 'atexport import-official')."
        ) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        hint = ""
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            hint = " It looks like an official AdapterTune checkpoint: convert it with 'atexport import-official'."
        raise BadInputError(f"{where}: not an atexport checkpoint (no '{FORMAT}' format tag).{hint}")
    _check_record(d, f"{where}")
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{where}: checkpoint format v{d.get('format_version')} is newer than this atexport "
            f"({__version__}, reads v{FORMAT_VERSION}); upgrade atexport."
        )
    if layout not in ("export", "trained"):
        raise ValueError(f"layout must be 'export' or 'trained', got {layout!r}")
    try:
        ckpt = Checkpoint(
            model=ModelSpec.from_dict(d["model"]),
            adapter=adapter_config_from_dict(d.get("adapter"), f"{where}"),
            regime=d["regime"],
            fingerprint=d["backbone"]["fingerprint"],
            state_dict=d["state_dict"],
            preprocess=d["preprocess"],
            metrics=d.get("metrics") or {},
            config=d.get("config") or {},
            resume=d.get("resume"),
            atexport_version=d.get("atexport_version", "?"),
            path=Path(path),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"{where}: damaged atexport checkpoint (missing field {e}).") from None
    return ckpt.for_export() if layout == "export" else ckpt


def _check_record(d: dict, where: str) -> None:
    """The shape of every field of a ``run.pt`` dict the stages rely on; one BadInputError naming the field."""
    import torch

    from atexport.artifact.metadata import check_preprocess

    def bad(what: str) -> BadInputError:
        return BadInputError(f"{where}: damaged atexport checkpoint ({what}); retrain, or restore the file.")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(d.get("format_version", 0)):
        raise bad("format_version must be an integer")
    m = d.get("model")
    if not isinstance(m, dict) or not isinstance(m.get("backbone"), str):
        raise bad("model must be an object with a backbone name")
    n = m.get("num_classes")
    if not is_int(n) or n < 1:
        raise bad("model.num_classes must be a positive integer")
    for key in ("model_args", "source"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            raise bad(f"model.{key} must be an object")
    names = m.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == n and all(isinstance(x, str) for x in names)):
        raise bad(f"model.class_names must be {n} strings")
    if not isinstance(d.get("backbone"), dict) or not isinstance(d["backbone"].get("fingerprint"), str):
        raise bad("backbone.fingerprint must be a string")
    if not isinstance(d.get("regime"), str):
        raise bad("regime must be a string")
    check_preprocess(d.get("preprocess"), where)
    sd = d.get("state_dict")
    if not isinstance(sd, dict) or not sd:
        raise bad("state_dict must hold tensors")
    odd = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
           or not v.is_floating_point()]
    if odd:
        raise bad(f"state_dict entries {odd[:3]} are not floating-point tensors")
    for key in ("metrics", "config", "resume", "adapter"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise bad(f"{key} must be an object")


def check_fingerprint(expected: str, model, what: str) -> None:
    actual = backbone_fingerprint(model)
    if actual != expected:
        raise IncompatibleCheckpointError(
            f"{what}: the backbone's tensors differ from the one the checkpoint was trained on "
            f"(fingerprint {actual[:12]} != {expected[:12]}). Pass the original weights with "
            "--backbone-weights FILE, or retrain the adapters on this backbone."
        )


def build_model(ckpt: Checkpoint, backbone_weights: str | Path | None = None):
    """Rebuild the trained PyTorch model (eval mode, CPU) from a checkpoint and its backbone.

    Refuses a backbone whose fingerprint differs from the one recorded at training time.
    """
    ckpt = ckpt.for_export()
    model = create_backbone(ckpt.model, weights=backbone_weights)
    check_fingerprint(ckpt.fingerprint, model, f"checkpoint {ckpt.path or ''}".strip())
    if ckpt.adapter is not None:
        inject_adapters(model, ckpt.adapter)
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    if unexpected:
        raise IncompatibleCheckpointError(
            f"checkpoint {ckpt.path}: tensors {unexpected[:5]} have no place in {ckpt.model.backbone} "
            f"with adapter {ckpt.adapter}."
        )
    expected = set(trainable_state(model, ckpt.regime))
    lacking = sorted(expected - set(ckpt.state_dict))
    if lacking:
        raise IncompatibleCheckpointError(f"checkpoint {ckpt.path}: tensors missing: {lacking[:5]}.")
    return export_model(ckpt.adapter, model).eval()


def import_official(
    path: str | Path,
    backbone: str,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    model_args: dict | None = None,
    source: dict | None = None,
    alpha: float = 1.0,
    backbone_weights: str | Path | None = None,
) -> Checkpoint:
    """Convert a checkpoint of the official AdapterTune code (``{"model": state_dict, ...}``).

    Rank and placement are read off the tensors; the frozen backbone tensors in the file are checked
    against the given backbone so the fingerprint recorded is the one the adapters were trained on.
    """
    from atexport.adapters.adaptertune import infer_adapter_config  # official checkpoints are AdapterTune's

    path = require_file(path, "--ckpt", "checkpoint")
    d = load_torch_file(path, "--ckpt", "weights-only AdapterTune checkpoint")
    sd = d.get("model", d) if isinstance(d, dict) else None
    if not isinstance(sd, dict) or "head.weight" not in sd:
        raise BadInputError(f"--ckpt {path}: no AdapterTune state dict (expected 'model' with head.* tensors).")
    n_cls = int(sd["head.weight"].shape[0])
    if num_classes is not None and num_classes != n_cls:
        raise IncompatibleCheckpointError(f"--ckpt {path}: head has {n_cls} classes, not {num_classes}.")
    spec = ModelSpec(
        backbone=backbone,
        num_classes=n_cls,
        model_args=dict(model_args or {}),
        source=dict(source or {"kind": "timm"}),
        class_names=class_names,
    )
    model = create_backbone(spec, weights=backbone_weights)
    given = backbone_fingerprint(model)
    depth = len(model.blocks)
    cfg = infer_adapter_config(sd, depth, alpha=alpha)
    inject_adapters(model, cfg)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise IncompatibleCheckpointError(
            f"--ckpt {path} does not fit {backbone}: {str(e).splitlines()[-1].strip()[:300]}"
        ) from None
    if missing or unexpected:
        raise IncompatibleCheckpointError(
            f"--ckpt {path} does not fit {backbone}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    if backbone_fingerprint(model) != given:
        # The file's frozen tensors are what the adapters were trained on; a checkpoint recording them
        # while its source rebuilds another backbone would be refused by every later stage.
        raise IncompatibleCheckpointError(
            f"--ckpt {path}: its backbone tensors differ from those of {backbone}"
            f"{' with --backbone-weights ' + str(backbone_weights) if backbone_weights else ''}. Name the "
            "backbone (with its pretrained tag) it was trained on, or pass --backbone-weights with the "
            "official checkpoint itself."
        )
    state = trainable_state(model, "adapter")
    bad = [k for k, v in state.items() if not bool(v.isfinite().all())]
    if bad:
        raise BadInputError(
            f"--ckpt {path}: tensors {bad[:3]} hold NaN or infinite values (the official run diverged, or the file "
            "is damaged); nothing was written. Convert a checkpoint of an earlier, finite epoch."
        )
    from atexport.models import check_forward

    check_forward(model, preprocess_config(model)["input_size"], f"--model-args {dict(model_args or {})} of {backbone}")
    if backbone_weights is not None:
        spec.source = {"kind": "file", "path": str(backbone_weights)}
    return Checkpoint(
        model=spec,
        adapter=cfg,
        regime="adapter",
        fingerprint=backbone_fingerprint(model),
        state_dict=state,
        preprocess=preprocess_config(model),
        config={"imported_from": str(path)},
    )
