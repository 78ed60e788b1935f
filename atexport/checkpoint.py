"""The atexport checkpoint: a small, weights-only file of what training changed.

``run.pt`` is a plain dict that loads with ``torch.load(..., weights_only=True)``: a format name and
version, the model spec (backbone, architecture overrides, classes), the adapter config, the training
regime, the backbone fingerprint and preprocessing, the trainable tensors only (adapters + head; the
whole state dict for ``full``), final metrics, and the resolved training config. A vit_small rank-16
adapter checkpoint is about 1-2 MB. Files are written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atexport import __version__
from atexport.adapter import AdapterConfig, inject_adapters, infer_adapter_config
from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.models import (
    HEAD_PREFIXES,
    ModelSpec,
    backbone_fingerprint,
    create_backbone,
    preprocess_config,
)
from atexport.utils.io import atomic_write_bytes, require_file

FORMAT = "atexport.checkpoint"
FORMAT_VERSION = 1
REGIMES = ("adapter", "head", "full")


@dataclass
class Checkpoint:
    """In-memory form of ``run.pt``."""

    model: ModelSpec
    adapter: AdapterConfig | None
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
        return self.path.stem if self.path else "model"

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


def trainable_state(model, regime: str) -> dict:
    """The tensors a checkpoint stores for ``regime`` (detached CPU copies)."""
    sd = model.state_dict()
    if regime == "full":
        keep = sd
    elif regime == "head":
        keep = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
    else:
        keep = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES) or ".adapter." in k}
    return {k: v.detach().cpu().clone() for k, v in keep.items()}


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically (temp file beside ``path``, then rename)."""
    import torch

    buf = io.BytesIO()
    torch.save(ckpt.to_dict(), buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, flag: str = "--ckpt") -> Checkpoint:
    """Load and validate an atexport checkpoint; never unpickles code."""
    import torch

    path = require_file(path, flag, "checkpoint")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message advises weights_only=False, i.e. running the file's pickled code: never here.
        reason = str(e).splitlines()[0].split(" In PyTorch 2.6")[0][:200]
        raise BadInputError(
            f"{flag} {path}: not a readable atexport checkpoint ({reason}). "
            "It must be a run.pt written by 'atexport train' (or converted with 'atexport import-official')."
        ) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        hint = ""
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            hint = " It looks like an official AdapterTune checkpoint: convert it with 'atexport import-official'."
        raise BadInputError(f"{flag} {path}: not an atexport checkpoint (no '{FORMAT}' format tag).{hint}")
    if int(d.get("format_version", 0)) > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{flag} {path}: checkpoint format v{d.get('format_version')} is newer than this atexport "
            f"({__version__}, reads v{FORMAT_VERSION}); upgrade atexport."
        )
    try:
        return Checkpoint(
            model=ModelSpec.from_dict(d["model"]),
            adapter=AdapterConfig.from_dict(d["adapter"]) if d.get("adapter") else None,
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
    except (KeyError, TypeError) as e:
        raise BadInputError(f"{flag} {path}: damaged atexport checkpoint (missing field {e}).") from None


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
    return model.eval()


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
    import torch

    path = require_file(path, "--ckpt", "checkpoint")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInputError(f"--ckpt {path}: cannot read it as a weights-only checkpoint ({e}).") from None
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
    if backbone_weights is not None:
        spec.source = {"kind": "file", "path": str(backbone_weights)}
    return Checkpoint(
        model=spec,
        adapter=cfg,
        regime="adapter",
        fingerprint=backbone_fingerprint(model),
        state_dict=trainable_state(model, "adapter"),
        preprocess=preprocess_config(model),
        config={"imported_from": str(path)},
    )
