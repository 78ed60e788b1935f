"""Import checkpoints of the official AdapterTune code as atexport ``run.pt`` files.

The official trainer saves ``{"model": state_dict, "optimizer": ..., "epoch": ...}`` with the frozen
backbone's tensors included. :func:`convert_official` rebuilds the named timm backbone, checks that its
tensors are the ones the adapters were trained on, and writes a small adapters-plus-head checkpoint.

The official code trains and evaluates every backbone with ImageNet mean/std and
``Resize(256) + CenterCrop(224)`` (torchvision's bilinear), not the backbone's timm data config
(0.5 mean/std, crop 0.9, bicubic for augreg ViTs). An imported checkpoint therefore records the
official transform by default, so export, verify and the runtime feed the adapters the inputs they
were trained on; ``preprocess`` overrides it for forks that changed the transform.
"""

from __future__ import annotations

import math
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


def resolve_import_preprocess(preprocess, timm_config: dict) -> tuple[dict, str]:
    """The preprocess dict an imported checkpoint records, and a sentence saying which it is.

    Args:
        preprocess: ``"official"`` (default of the import), ``"timm"`` (the backbone's data config), or
            a mapping overriding fields of the official transform (``{crop_pct: 1.0}`` for a fork).
        timm_config: the backbone's timm preprocess dict (gives the input size).
    """
    from atexport.data.transforms import PREPROCESS_KEYS
    from atexport.models import official_preprocess

    official = official_preprocess(timm_config["input_size"])
    if preprocess is None or preprocess == "official":
        pp, what = official, "the official AdapterTune transform"
    elif preprocess == "timm":
        pp, what = dict(timm_config), "the backbone's timm data config (--preprocess timm)"
    elif isinstance(preprocess, dict):
        unknown = sorted(set(preprocess) - set(PREPROCESS_KEYS))
        if unknown:
            raise BadInputError(
                f"--preprocess: unknown keys {unknown}; expected some of {', '.join(PREPROCESS_KEYS)}."
            )
        pp, what = {**official, **preprocess}, f"the official transform with {preprocess}"
    else:
        raise BadInputError(
            f"--preprocess {preprocess!r}: expected 'official', 'timm', or a YAML mapping of fields, "
            "e.g. '{crop_pct: 1.0, interpolation: bicubic}'."
        )
    _check_preprocess(pp)
    takes = [int(v) for v in timm_config["input_size"]]
    try:
        given = [int(v) for v in pp["input_size"]]
    except (TypeError, ValueError):
        given = None
    if given != takes:
        raise BadInputError(
            f"--preprocess input_size {pp['input_size']}: the backbone takes {takes} (its img_size); an input of "
            "another size cannot run through it. Drop input_size from --preprocess, or build the backbone at that "
            "size with --model-args '{img_size: N}' if it was trained so."
        )
    c, h, w = pp["input_size"]
    size = math.floor(h / pp["crop_pct"])
    line = (f"preprocessing: {what}: resize {size} + center crop {h}x{w}, {pp['interpolation']}, "
            f"mean {_fmt(pp['mean'])} std {_fmt(pp['std'])}")
    return pp, line


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):g}" for x in v) + ")"


_RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # what atexport.runtime reproduces


def _check_preprocess(pp: dict) -> None:
    try:
        ok_stats = (all(len(pp[k]) == 3 for k in ("mean", "std")) and all(float(x) > 0 for x in pp["std"])
                    and all(math.isfinite(float(x)) for k in ("mean", "std") for x in pp[k]))
        ok_crop = 0 < float(pp["crop_pct"]) <= 1
    except (TypeError, ValueError):
        ok_stats = ok_crop = False
    if not (ok_stats and ok_crop and pp["interpolation"] in _RESAMPLE):
        raise BadInputError(
            f"--preprocess: {pp} is not a valid transform (mean/std: three finite numbers, std > 0; crop_pct in "
            f"(0, 1]; interpolation one of {', '.join(_RESAMPLE)})."
        )


def convert_official(
    ckpt: str | os.PathLike,
    backbone: str,
    output: str | os.PathLike,
    *,
    backbone_weights: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
    model_args: dict | None = None,
    alpha: float = 1.0,
    preprocess: str | dict = "official",
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
        preprocess: the transform to record: ``official`` (ImageNet mean/std, bilinear, resize 256 +
            center crop 224: what the official code trained with), ``timm`` (the backbone's data
            config), or a mapping overriding fields of the official one (forks).

    Returns:
        The written :class:`~atexport.checkpoint.Checkpoint`; ``ck.preprocess_note`` says which
        transform was recorded.
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
    ck.preprocess, note = resolve_import_preprocess(preprocess, ck.preprocess)
    ck.config = {"imported_from": str(Path(ckpt).resolve()), "backbone": backbone, "alpha": float(alpha),
                 "model_args": dict(model_args or {}),
                 "preprocess": preprocess if isinstance(preprocess, str) else dict(preprocess)}
    save_checkpoint(ck, out)
    ck.path = out
    ck.preprocess_note = note
    return ck
