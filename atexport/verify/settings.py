"""How ``atexport verify`` runs: the data set, the batch, the tolerances and the extra checks, made once and validated.

:class:`VerifySettings` is what :func:`atexport.verify.verify` and
:func:`atexport.verify.multitask.verify_multitask` read instead of two dozen loose arguments, so the single- and
multi-task paths see the same validated values::

    verify("run.pt", onnx="model.onnx", settings=VerifySettings(dataset="digits", limit=200))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from atexport.errors import BadInputError


@dataclass(frozen=True)
class VerifySettings:
    """The settings of one verification (every field has the CLI's default).

    Attributes:
        dataset: a data set name (``digits``, ``pets``, ...) or ``imagefolder:PATH``; for multi-task models one
            for all tasks, or a list with one per checkpoint, in order.
        split: ``train``, ``val`` or ``test``.
        limit: verify on a seeded random ``limit`` images of the split (default: all).
        seed: seed of the ``limit`` subset.
        data_dir: root of downloaded data sets.
        batch_size: images per inference call (a fixed-batch artifact uses its own).
        tolerances: tolerance table (name in ``export_configs/``, YAML path or dict).
        overrides: tolerance overrides, e.g. ``{"int8.min_cosine": 0.99}``.
        per_block: also compare every block of each ONNX artifact with PyTorch (single-task models).
        per_block_images: images used for the per-block comparison.
        mixed_images: multi-task models: images per task in the mixed-task batch check.
        openvino_precision: the precision the ``openvino`` artifacts run at (``fp32``, ``bf16``, ``fp16``,
            ``int8``, ``int8+bf16``; default: each file's own).
        threads: threads of ONNX Runtime and PyTorch (default: each library's own).
        providers: ONNX Runtime execution providers.
        backbone_weights: local backbone weights for the checkpoint(s).
        report: folder to write ``verify.json`` and ``verify.md`` to.
        progress: show a progress bar (``False``: one line every few seconds).

    Raises:
        BadInputError: no data set, a batch size, limit or mixed-batch size below 1.
    """

    dataset: str | Sequence[str] = "digits"
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    data_dir: str | os.PathLike | None = None
    batch_size: int = 32
    tolerances: str | os.PathLike | Mapping = "tolerances"
    overrides: Mapping[str, Any] | None = None
    per_block: bool = False
    per_block_images: int = 8
    mixed_images: int = 64
    openvino_precision: str | None = None
    threads: int | None = None
    providers: Sequence[str] | None = None
    backbone_weights: str | os.PathLike | None = None
    report: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise BadInputError(f"--batch-size {self.batch_size}: must be at least 1.")
        if self.limit is not None and int(self.limit) < 1:
            raise BadInputError(f"--limit {self.limit}: must be at least 1.")
        if int(self.mixed_images) < 1:
            raise BadInputError(f"mixed_images {self.mixed_images}: must be at least 1.")
        if not self.datasets:
            raise BadInputError("give a data set (--dataset).")

    @property
    def datasets(self) -> list[str]:
        """The data set(s) as a list: one, or one per checkpoint of a multi-task model."""
        d = self.dataset
        return [] if d is None else [str(v) for v in d] if isinstance(d, (list, tuple)) else [str(d)]

    @property
    def per_block_tolerances(self) -> str | os.PathLike | dict:
        """The tolerance table as :func:`~atexport.verify.per_block.compare_blocks` takes it."""
        return dict(self.tolerances) if isinstance(self.tolerances, Mapping) else self.tolerances
