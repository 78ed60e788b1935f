"""Precision ONNX models: FP16 mixed precision and explicit INT8 (Q/DQ), verified before any engine.

The ONNX model is the contract: precision is decided here and baked into an ONNX file (FP16 weights
and casts, or QuantizeLinear/DequantizeLinear nodes); ONNX Runtime checks it on the CPU against the
FP32 reference; TensorRT (10.x strongly typed, 11.x always strongly typed) then builds exactly that
file. Both conversions take an ONNX file in and write an ONNX file out, atomically, with the atexport
metadata carried over (``precision`` updated, the recipe and parity results in ``extra.precision``).

One module per subject:

* :mod:`~atexport.export.precision.fp16`: :func:`to_fp16` (LayerNorm and Softmax stay FP32).
* :mod:`~atexport.export.precision.int8`: :func:`quantize_int8` (Q/DQ on the Linear layers only;
  ``target`` ``tensorrt`` S8S8 or ``cpu`` U8S8).
* :mod:`~atexport.export.precision.keep_float`: INT8 mixed precision (the most sensitive Linear layers,
  or named ones, stay float).
* :mod:`~atexport.export.precision.calibration`: calibration sets and the cache of their results;
  :mod:`~atexport.export.precision.calibrate`: ONNX Runtime's calibrator.
* :mod:`~atexport.export.precision.inspect`: graph inspection (:func:`fp16_report`, :func:`qdq_report`,
  :func:`check_fp16_graph`, :func:`check_int8_graph`, :func:`linear_nodes`, :func:`layer_names`).
* :mod:`~atexport.export.precision.common`: the result, the preset, reading the input, the verified write.
* :mod:`~atexport.export.precision.options`: the settings, made once and validated: :class:`Int8Options`,
  :class:`Fp16Options`, :class:`ParityCheck`.

:func:`convert_precision` is the one entry point ``atexport trt`` uses; :func:`check_precision_flags`
refuses options that do not apply to the chosen precision (``calibration`` with ``fp16``...), so a
Python caller is refused exactly as the command line is.
"""

from __future__ import annotations

from typing import Mapping

from atexport.errors import BadInputError
from atexport.export.precision.calibration import (
    CalibrationSet,
    CalibrationWarning,
    available_sets,
    load_calibration_set,
)
from atexport.export.precision.common import (
    LINEAR_OPS,
    METHODS,
    OP_POLICIES,
    PRECISIONS,
    TARGETS,
    PrecisionResult,
    precision_path_for,
    failed_path_for,
    load_precision_config,
)
from atexport.export.precision.fp16 import to_fp16
from atexport.export.precision.inspect import (
    check_fp16_graph,
    check_int8_graph,
    float_types_by_node,
    fp16_report,
    layer_names,
    linear_nodes,
    qdq_report,
    toposort,
)
from atexport.export.precision.int8 import int8_settings, quantize_int8
from atexport.export.precision.options import Fp16Options, Int8Options, ParityCheck
from atexport.export.precision.keep_float import (
    RANK_BY,
    SENSITIVITY_MODES,
    choose_keep_float,
    keep_layers_float,
    layer_sensitivity,
    logit_error,
    parse_keep_float,
    rank_layers,
    select_layers,
)

__all__ = [
    "CalibrationSet", "CalibrationWarning", "Fp16Options", "Int8Options", "LINEAR_OPS", "ParityCheck",
    "METHODS", "OP_POLICIES", "PRECISIONS", "RANK_BY",
    "SENSITIVITY_MODES", "TARGETS", "PrecisionResult", "available_sets", "check_fp16_graph", "check_int8_graph",
    "check_precision_flags", "choose_keep_float", "convert_precision", "precision_path_for", "failed_path_for",
    "float_types_by_node", "fp16_report", "int8_settings", "keep_layers_float", "layer_names", "layer_sensitivity",
    "linear_nodes", "load_calibration_set", "load_precision_config", "logit_error", "parse_keep_float",
    "qdq_report", "quantize_int8", "rank_layers", "select_layers", "to_fp16", "toposort",
]

# Options only INT8 has: (keyword of check_precision_flags, the atexport trt flag); Int8Options.as_given() names them.
INT8_OPTIONS = (
    ("calibration", "--calib"),
    ("count", "--calib-count"),
    ("method", "--calib-method"),
    ("cache", "--calib-cache"),  # cache=False is --no-calib-cache
    ("keep_float", "--int8-keep-float"),
    ("smooth", "--int8-smooth"),
    ("target", "--target"),
    ("op_policy", "op_policy"),
)
# Options only FP16 has.
FP16_OPTIONS = (("block_ops", "block_ops"), ("keep_io_types", "keep_io_types"))


def check_precision_flags(precision: str, **options) -> None:
    """Refuse options that do not apply to ``precision``, with one sentence naming the flag.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8``.
        **options: the options given, by their :meth:`Int8Options.as_given` / :meth:`Fp16Options.as_given`
            keyword (``calibration``, ``count``, ``method``, ``cache``, ``keep_float``, ``smooth``, ``target``,
            ``op_policy``, ``block_ops``, ``keep_io_types``); ``None`` means not given.

    Raises:
        BadInputError: an unknown precision, or an option of another precision (exit 2).
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision {precision}: expected one of {PRECISIONS}.")
    given = {k for k, v in options.items() if v is not None}
    known = {k for k, _ in INT8_OPTIONS + FP16_OPTIONS}
    unknown = sorted(given - known)
    if unknown:
        raise BadInputError(f"unknown precision option(s) {unknown}; expected some of {sorted(known)}.")
    if precision != "int8":
        for key, flag in INT8_OPTIONS:
            if key in given:
                flag = "--no-calib-cache" if key == "cache" and options[key] is False else flag
                why = " (FP16 needs no calibration images)" if precision == "fp16" and key == "calibration" else ""
                raise BadInputError(f"{flag} applies to --precision int8, not {precision}{why}; drop it.")
    if precision != "fp16":
        for key, flag in FP16_OPTIONS:
            if key in given:
                raise BadInputError(f"{flag} applies to --precision fp16, not {precision}; drop it.")


def convert_precision(onnx_in, precision: str, onnx_out=None, *, int8: Int8Options | None = None,
                      fp16: Fp16Options | None = None, verify: bool = True, reference=None, images=None,
                      config: str | Mapping = "precision", log=None) -> PrecisionResult:
    """Convert an FP32 atexport ONNX model to ``fp16`` (:func:`to_fp16`) or ``int8`` (:func:`quantize_int8`).

    Options of the other precision are refused (:func:`check_precision_flags`), and so is ``fp32``
    (nothing to convert).

    Args:
        onnx_in, onnx_out: the FP32 model and the output path (default beside it).
        precision: ``fp16`` or ``int8``.
        int8: INT8 only (:class:`Int8Options`, see :func:`quantize_int8`); its ``calib`` is required for INT8.
        fp16: FP16 only (:class:`Fp16Options`: ``block_ops``, ``keep_io_types``, see :func:`to_fp16`).
        verify, reference, images, config, log: as in :func:`to_fp16`.
    """
    int8 = int8 if int8 is not None else Int8Options()
    fp16 = fp16 if fp16 is not None else Fp16Options()
    check_precision_flags(precision, **int8.as_given(), **fp16.as_given())
    if precision == "fp32":
        raise BadInputError("--precision fp32: expected fp16 or int8 for a precision model (an FP32 model needs no conversion).")
    common = {"verify": verify, "reference": reference, "images": images, "config": config, "log": log}
    if precision == "fp16":
        return to_fp16(onnx_in, onnx_out, block_ops=fp16.block_ops, keep_io_types=fp16.keep_io_types, **common)
    if int8.calib is None:
        raise BadInputError(
            "INT8 needs calibration images: --calib NAME (sets: " + ", ".join(available_sets()) + ") or --calib DIR "
            "(a folder of the task's images)."
        )
    return quantize_int8(onnx_in, onnx_out, options=int8, **common)
