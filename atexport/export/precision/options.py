"""The settings of a precision conversion, each group made once and validated on construction.

:class:`Int8Options` is what an INT8 conversion was asked (calibration images, method, cache, layers kept
float, smoothing, target, op policy); ``atexport trt`` builds one from its flags and hands it to
:func:`~atexport.export.tensorrt.export_tensorrt`, which hands it to
:func:`~atexport.export.precision.convert_precision` and :func:`~atexport.export.precision.quantize_int8`.
:class:`Fp16Options` is the FP16 counterpart. :class:`ParityCheck` is how a converted model is checked
before it is written (:func:`~atexport.export.precision.verified.finish`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from atexport.errors import BadInputError
from atexport.export.precision.common import METHODS, OP_POLICIES, TARGETS


@dataclass(frozen=True)
class Int8Options:
    """INT8 conversion options (see :func:`atexport.export.precision.quantize_int8`); validated on construction.

    Attributes:
        calib: calibration images: a set in ``calibration/``, a YAML file, a folder, a
            :class:`~atexport.export.precision.calibration.CalibrationSet`, a dict, or a preprocessed float32 batch.
        count: calibration images to draw.
        method: ``minmax``, ``percentile`` or ``entropy`` (default: from ``export_configs/precision.yaml``).
        cache: calibration cache file; ``False``: neither read nor write one.
        keep_float: Linear layers left in float (``auto``, ``none``, N, or names/globs).
        smooth: SmoothQuant outlier migration: ``off`` or an alpha in (0, 1] (default: from the preset).
        target: ``tensorrt`` (symmetric S8S8) or ``cpu`` (U8S8 for ONNX Runtime; no engine is built).
        op_policy: ``linear`` (MatMul/Gemm with constant weights only) or ``all`` (every op ONNX Runtime
            can quantize; exists to show why ``linear`` is the default).
    """

    calib: Any = None
    count: int | None = None
    method: str | None = None
    cache: str | os.PathLike | bool | None = None
    keep_float: Any = None
    smooth: Any = None
    target: str = "tensorrt"
    op_policy: str = "linear"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise BadInputError(f"--target {self.target}: expected one of {', '.join(TARGETS)}.")
        if self.method is not None:
            object.__setattr__(self, "method", str(self.method).lower())
            if self.method not in METHODS:
                raise BadInputError(f"--calib-method {self.method}: expected one of {', '.join(METHODS)}.")
        count = self.count
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise BadInputError(f"--calib-count {self.count}: must be a positive integer.")
        if self.op_policy not in OP_POLICIES:
            raise BadInputError(f"op_policy {self.op_policy!r}: expected one of {OP_POLICIES}.")

    def given(self) -> list[str]:
        """The INT8 flags set to something other than their default."""
        named = (("--calib", self.calib is not None), ("--calib-count", self.count is not None),
                 ("--calib-method", self.method is not None), ("--calib-cache", self.cache not in (None, False)),
                 ("--no-calib-cache", self.cache is False), ("--int8-keep-float", self.keep_float is not None),
                 ("--int8-smooth", self.smooth is not None), ("--target", self.target != "tensorrt"),
                 ("op_policy", self.op_policy != "linear"))
        return [flag for flag, on in named if on]

    def as_given(self) -> dict:
        """The options by their :func:`~atexport.export.precision.check_precision_flags` keyword; ``None``
        where a value is the default (not given)."""
        return {"calibration": self.calib, "count": self.count, "method": self.method, "cache": self.cache,
                "keep_float": self.keep_float, "smooth": self.smooth,
                "target": None if self.target == "tensorrt" else self.target,
                "op_policy": None if self.op_policy == "linear" else self.op_policy}


@dataclass(frozen=True)
class Fp16Options:
    """FP16 conversion options (see :func:`atexport.export.precision.to_fp16`).

    Attributes:
        block_ops: op types kept in FP32 (default from the preset: LayerNormalization, Softmax).
        keep_io_types: keep graph inputs and outputs FP32 (default: on).
    """

    block_ops: Sequence[str] | None = None
    keep_io_types: bool | None = None

    def __post_init__(self):
        if isinstance(self.block_ops, str):
            raise BadInputError(f"block_ops {self.block_ops!r}: expected a list of ONNX op types.")

    def as_given(self) -> dict:
        """The options by their :func:`~atexport.export.precision.check_precision_flags` keyword."""
        return {"block_ops": self.block_ops, "keep_io_types": self.keep_io_types}


@dataclass(frozen=True)
class ParityCheck:
    """How a converted model is checked before it is written.

    Attributes:
        verify: check parity at all (off: the model is written unchecked).
        reference: a runner to compare against; ``None``: the FP32 input model in ONNX Runtime.
        images: extra real in-domain images (a folder or a list).
        parity: the preset's ``parity`` section.
        say: receives progress lines.
    """

    verify: bool = True
    reference: Any = None
    images: Any = None
    parity: Mapping = None
    say: Callable = None

    def __post_init__(self):
        object.__setattr__(self, "parity", dict(self.parity or {}))
        if self.say is None:
            object.__setattr__(self, "say", lambda *_: None)
