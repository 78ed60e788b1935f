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

:func:`convert_precision` is the one entry point ``atexport trt`` uses; :func:`check_precision_flags`
refuses options that do not apply to the chosen precision (``calibration`` with ``fp16``...), so a
Python caller is refused exactly as the command line is.
"""

from __future__ import annotations

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
    "CalibrationSet", "CalibrationWarning", "LINEAR_OPS", "METHODS", "OP_POLICIES", "PRECISIONS", "RANK_BY",
    "SENSITIVITY_MODES", "TARGETS", "PrecisionResult", "available_sets", "check_fp16_graph", "check_int8_graph",
    "check_precision_flags", "choose_keep_float", "convert_precision", "precision_path_for", "failed_path_for",
    "float_types_by_node", "fp16_report", "int8_settings", "keep_layers_float", "layer_names", "layer_sensitivity",
    "linear_nodes", "load_calibration_set", "load_precision_config", "logit_error", "parse_keep_float",
    "qdq_report", "quantize_int8", "rank_layers", "select_layers", "to_fp16", "toposort",
]

# Options only INT8 has: (keyword of convert_precision / quantize_int8, the atexport trt flag).
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
        **options: the options given, by their :func:`convert_precision` keyword (``calibration``, ``count``,
            ``method``, ``cache``, ``keep_float``, ``smooth``, ``target``, ``op_policy``, ``block_ops``, ``keep_io_types``);
            ``None`` means not given.

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


def convert_precision(onnx_in, precision: str, onnx_out=None, *, calibration=None, count=None, method=None,
                      cache=None, keep_float=None, smooth=None, target=None, op_policy=None, block_ops=None,
                      keep_io_types=None, **common) -> PrecisionResult:
    """Convert an FP32 atexport ONNX model to ``fp16`` (:func:`to_fp16`) or ``int8`` (:func:`quantize_int8`).

    Options of the other precision are refused (:func:`check_precision_flags`), and so is ``fp32``
    (nothing to convert).

    Args:
        onnx_in, onnx_out: the FP32 model and the output path (default beside it).
        precision: ``fp16`` or ``int8``.
        calibration, count, method, cache, keep_float, smooth, target, op_policy: INT8 only (see :func:`quantize_int8`);
            ``calibration`` is required for INT8.
        block_ops, keep_io_types: FP16 only (see :func:`to_fp16`).
        **common: ``verify``, ``reference``, ``images``, ``config``, ``log``.
    """
    int8 = {"calibration": calibration, "count": count, "method": method, "cache": cache, "keep_float": keep_float,
            "smooth": smooth, "target": target, "op_policy": op_policy}
    fp16 = {"block_ops": block_ops, "keep_io_types": keep_io_types}
    check_precision_flags(precision, **int8, **fp16)
    if precision == "fp32":
        raise BadInputError("--precision fp32: expected fp16 or int8 for a precision model (an FP32 model needs no conversion).")
    if precision == "fp16":
        return to_fp16(onnx_in, onnx_out, block_ops=block_ops, keep_io_types=keep_io_types, **common)
    if calibration is None:
        raise BadInputError(
            "INT8 needs calibration images: --calib NAME (sets: " + ", ".join(available_sets()) + ") or --calib DIR "
            "(a folder of the task's images)."
        )
    return quantize_int8(onnx_in, onnx_out, calibration, count=count, method=method, cache=cache, keep_float=keep_float,
                         smooth=smooth, target=target, op_policy=op_policy or "linear", **common)
