"""Import checkpoints of the official AdapterTune code as atexport ``run.pt`` files.

The official trainer saves ``{"model": state_dict, "optimizer": ..., "epoch": ...}`` with the frozen
backbone's tensors included. :func:`convert_official` rebuilds the named timm backbone, checks that its
tensors are the ones the adapters were trained on, and writes a small adapters-plus-head checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from atexport.errors import BadInputError


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"--class-names {p}: no such file.")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise BadInputError(f"--class-names {p}: the file holds no names (one per line expected).")
    return names


def convert_official(
    ckpt: str | os.PathLike,
    backbone: str,
    output: str | os.PathLike,
    *,
    backbone_weights: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
    model_args: dict | None = None,
    alpha: float = 1.0,
):
    """Convert an official AdapterTune checkpoint and write it atomically to ``output``.

    Args:
        ckpt: the official ``best.pt``/``last.pt``.
        backbone: timm name (with tag) of the backbone it was trained on.
        output: the ``run.pt`` to write.
        backbone_weights: local backbone weights instead of timm's hub (the official file itself works).
        class_names: one name per class (default ``class_0``...).
        model_args: architecture overrides (img_size, patch_size...).
        alpha: adapter scale used in training (the official default is 1.0).

    Returns:
        The written :class:`~atexport.checkpoint.Checkpoint`.
    """
    from atexport.checkpoint import import_official, save_checkpoint
    from atexport.utils.io import check_writable, sha256_file

    out = check_writable(output)
    source = None
    if backbone_weights is not None:
        wp = Path(backbone_weights).expanduser()
        if not wp.is_file():
            raise BadInputError(f"--backbone-weights {wp}: no such file.")
        source = {"kind": "file", "path": str(wp.resolve()), "sha256": sha256_file(wp)}
        backbone_weights = wp.resolve()
    ck = import_official(
        ckpt, backbone, class_names=class_names, model_args=model_args, source=source, alpha=alpha,
        backbone_weights=backbone_weights,
    )
    if source is not None:
        ck.model.source = source
    if class_names is None:
        ck.model.class_names = [f"class_{i}" for i in range(ck.model.num_classes)]
    elif len(class_names) != ck.model.num_classes:
        raise BadInputError(
            f"--class-names: {len(class_names)} names for a head with {ck.model.num_classes} classes."
        )
    ck.config = {"imported_from": str(Path(ckpt).resolve()), "backbone": backbone, "alpha": float(alpha),
                 "model_args": dict(model_args or {})}
    save_checkpoint(ck, out)
    ck.path = out
    return ck
