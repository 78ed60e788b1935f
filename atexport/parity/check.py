"""Parity of an exported artifact against its PyTorch reference, on real photos and random inputs.

Every export (ONNX here; FP16, INT8 and TensorRT in later stages) runs the same check: the reference
runner and the candidate runner see the same batches of real photographs (the samples scikit-image
ships, plus any images the user adds, through the model's own preprocessing) and of seeded random
inputs, at each batch size asked for; the logits are compared with :func:`atexport.parity.compare.compare`
against the tolerances of the artifact's precision (``export_configs/tolerances.yaml``). A row per
(input kind, batch size) comes back; :func:`~atexport.parity.compare.require_passed` turns any failing
row into a :class:`~atexport.errors.ParityError`. How many random inputs, which batch sizes and which
tolerance table are one :class:`ParitySettings`, usually read from an export config's ``parity:`` section.

This module imports neither torch nor onnxruntime: the runners bring their own backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from atexport.errors import BadInputError
from atexport.runtime.base import Runner
from atexport.parity.compare import ParityResult, Tolerance, compare, load_tolerances
from atexport.parity.images import random_batch
from atexport.runtime.batching import run_batched


@dataclass(frozen=True)
class ParitySettings:
    """How :func:`check_parity` runs, beside the inputs it is given.

    Attributes:
        random_inputs: how many seeded random inputs to add (0: none).
        input_shape: (C, H, W) of the random inputs; taken from the images when omitted.
        seed: seed of the random inputs.
        batch_sizes: run every input set at each of these batch sizes (one result row each); a
            dynamic-batch artifact is checked at several, a fixed-batch one at its own.
        tolerances: name of the tolerance table in ``export_configs/``.
        tolerance: explicit limits; overrides the table.

    Raises:
        BadInputError: a batch size below 1, a negative number of random inputs.
    """

    random_inputs: int = 8
    input_shape: Sequence[int] | None = None
    seed: int = 0
    batch_sizes: Sequence[int] = (1,)
    tolerances: str = "tolerances"
    tolerance: Tolerance | None = None

    def __post_init__(self):
        sizes = [int(bs) for bs in self.batch_sizes]
        if any(bs < 1 for bs in sizes):
            raise BadInputError(f"parity batch sizes must be >= 1, got {sizes}.")
        if int(self.random_inputs) < 0:
            raise BadInputError(f"parity random inputs must be >= 0, got {self.random_inputs}.")
        object.__setattr__(self, "batch_sizes", tuple(sizes))
        object.__setattr__(self, "random_inputs", int(self.random_inputs))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))

    def limits(self, precision: str) -> Tolerance:
        """The tolerance ``precision`` is held to: the explicit one, else the table's row."""
        if self.tolerance is not None:
            return self.tolerance
        table = load_tolerances(self.tolerances)
        if precision not in table:
            raise BadInputError(f"no tolerances for precision {precision!r} in {self.tolerances}.yaml; "
                                f"have {sorted(table)}.")
        return table[precision]


def check_parity(
    reference: Runner,
    candidate: Runner,
    images: np.ndarray | None,
    precision: str = "fp32",
    *,
    judged: np.ndarray | None = None,
    judged_name: str = "held-out",
    settings: ParitySettings | None = None,
    feeds: dict | None = None,
    label: str = "",
) -> list[ParityResult]:
    """Compare ``candidate`` with ``reference`` on in-domain images, photos and seeded random inputs.

    When in-domain images are given (``judged``: a calibration set's held-out images, the user's own
    images), they decide: their row is judged by the full rule of :func:`~atexport.parity.compare.compare`
    (tie-aware top-1 flips, cosine outliers, with confidence bounds) at the largest batch size, and the
    photos and random inputs become smoke rows (magnitude only) at every batch size. Without them, the
    photos and random inputs are judged.

    Args:
        reference: usually a :class:`~atexport.runtime.torch.TorchRunner` on the FP32 model.
        candidate: the artifact's runner (ONNX Runtime, TensorRT...).
        images: preprocessed photos, float32 NCHW (see :func:`photo_batch`), or ``None``.
        precision: which row of the tolerance table applies (``fp32``, ``fp16``, ``bf16``, ``int8``).
        judged: preprocessed in-domain images, or ``None`` / empty.
        judged_name: the name of their row (``held-out digits``).
        settings: random inputs, batch sizes and tolerances (default: :class:`ParitySettings`' defaults).
        feeds: extra named inputs given to both runners with every batch.
        label: prefix of the row names.

    Returns:
        One :class:`ParityResult` per (input set, batch size).
    """
    s = settings or ParitySettings()
    tolerance = s.limits(precision)
    has_judged = judged is not None and len(judged) > 0
    sets = _input_sets(images, judged if has_judged else None, judged_name, s)
    sizes = list(s.batch_sizes)
    # The in-domain decisions are judged once, at the largest batch size; the other rows at every size.
    runs = [(max(sizes), *sets[0])] if has_judged else []
    runs += [(bs, *st) for bs in sizes for st in sets[1 if has_judged else 0:]]
    prefix = f"{label} " if label else ""
    results = []
    for bs, kind, x, judge in runs:
        ref = run_batched(reference, x, bs, feeds=feeds)
        cand = run_batched(candidate, x, bs, feeds=feeds)
        results.append(compare(ref, cand, tolerance, name=f"{prefix}{kind} (batch {bs})", judged=judge))
    return results


def _input_sets(images, judged, judged_name: str, s: ParitySettings) -> list[tuple[str, np.ndarray, bool]]:
    """``(name, inputs, judged)`` per input set: the in-domain images first (judged), then photos and random
    inputs (judged only without in-domain images)."""
    sets = []
    input_shape = s.input_shape
    if judged is not None:
        sets.append((judged_name, np.ascontiguousarray(judged, dtype=np.float32), True))
        input_shape = input_shape or judged.shape[1:]
    if images is not None and len(images):
        sets.append(("photos", np.ascontiguousarray(images, dtype=np.float32), judged is None))
        input_shape = input_shape or images.shape[1:]
    if s.random_inputs:
        if input_shape is None:
            raise BadInputError("check_parity needs input_shape (C, H, W) for random inputs when no images are given.")
        sets.append(("random", random_batch(s.random_inputs, input_shape, s.seed), judged is None))
    if not sets:
        raise BadInputError("check_parity has nothing to compare: no images and random_inputs=0.")
    return sets
