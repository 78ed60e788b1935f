"""Checking an existing precision model against its FP32 model, by the same rule its conversion used.

:func:`check_precision` re-runs the parity check of :func:`~atexport.export.precision.to_fp16` /
:func:`~atexport.export.precision.quantize_int8` on models already on disk: the held-out images of the
calibration set recorded in the INT8 model's metadata (plus the user's images) are judged, photos and
random inputs are smoke rows, and a failure names the first Linear layer where the error leaves the
per-block tolerance. A model edited after its conversion (a weight, a Q/DQ scale) is caught here.
"""

from __future__ import annotations

import os
from typing import Mapping

from atexport.errors import BadInputError


def check_precision(candidate: str | os.PathLike, fp32: str | os.PathLike, *, images=None,
                    config: str | Mapping = "precision", log=None) -> list:
    """Parity rows of the precision model ``candidate`` against ``fp32`` in ONNX Runtime.

    Raises:
        BadInputError: ``candidate`` is an FP32 model, or ``fp32`` is not (exit 2).
        ParityError: a row failed; the message names where the model breaks (exit 5).
    """
    from atexport.artifact.onnx import read_onnx_model
    from atexport.errors import ParityError
    from atexport.export.precision.calibration import holdout_for
    from atexport.export.precision.common import load_precision_config
    from atexport.export.precision.verified import _where_it_breaks, precision_parity
    from atexport.parity.compare import format_table

    say = log or (lambda *_: None)
    cand, meta = read_onnx_model(candidate, "--onnx")
    src, src_meta = read_onnx_model(fp32, "--fp32")
    if meta.precision == "fp32":
        raise BadInputError(f"{candidate} is an FP32 model; check an FP16 or INT8 model against its FP32 model.")
    if src_meta.precision != "fp32":
        raise BadInputError(f"--fp32 {fp32} is a {src_meta.precision} model; give the FP32 model it was made from.")
    par = load_precision_config(config)["parity"]
    holdout, name = holdout_for(meta, say)
    rows, ref = precision_parity(cand.SerializeToString(), src, meta, meta.precision, None, images, par, say,
                                 holdout, name)
    if not all(r.passed for r in rows):
        where = _where_it_breaks(cand, src, meta, meta.precision, images, holdout, par)
        raise ParityError(f"{candidate} does not match {ref} within the {meta.precision} tolerances{where}:\n"
                          f"{format_table(rows)}")
    return rows
