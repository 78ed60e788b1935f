"""Running ONNX Runtime's calibrator on a preprocessed batch, and keeping its expected chatter quiet.

:func:`calibrate` measures the activation ranges of the tensors INT8 quantization will scale (minmax,
percentile or entropy), feeding images in slices so the histogram calibrators' memory stays bounded.
ONNX Runtime says a few things on every call that atexport expects and that would only alarm a user:
its C++ logger warns once per overridable initializer ("Initializer ... appears in graph inputs", one
line per swappable tensor of a separable model), and ``onnxruntime.quantization`` advises
pre-processing through Python's root logger. :func:`expected_ort_messages` and
:func:`expected_quantizer_logs` drop exactly those messages for the duration of a call; every other
message still reaches the user.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from atexport.artifact.bank import mixed_task_ids
from atexport.errors import BadInputError
from atexport.export.precision.common import METHODS

# ONNX Runtime log messages (C++ logger) that calibration always causes on a model with overridable
# initializers (separable and multi-task models): the swappable tensors are graph inputs on purpose.
EXPECTED_ORT_MESSAGES = ("appears in graph inputs and will not be treated as constant value",)
# onnxruntime.quantization's advice through the root logger: atexport's graphs need no pre-processing
# (shapes are inferred, LayerNorm/GELU are single nodes); "all" ops per-channel on a 1-D weight (LayerNorm)
# falls back to per-tensor, which is what that policy means.
EXPECTED_QUANTIZER_LOGS = ("consider to run pre-processing", "consider pre-processing", "is out-of-range for weight")
_SEVERITY = "VIWEF"


@contextlib.contextmanager
def expected_ort_messages(patterns: Sequence[str] = EXPECTED_ORT_MESSAGES):
    """Drop ONNX Runtime warnings that contain one of ``patterns`` while the block runs; pass on the rest.

    Uses ONNX Runtime's logging callback (``onnxruntime.set_default_logger_callback``); messages that
    do not match are written to stderr as ONNX Runtime would. An ONNX Runtime without that callback
    gets its default logger raised to ERROR for the block instead (and set back to WARNING after).
    """
    import onnxruntime as ort

    setter = getattr(ort, "set_default_logger_callback", None)
    if setter is None:
        ort.set_default_logger_severity(3)
        try:
            yield
        finally:
            ort.set_default_logger_severity(2)
        return

    def forward(severity, category, logid, location, message):
        if severity == 2 and any(p in message for p in patterns):
            return
        sys.stderr.write(f"[{_SEVERITY[min(max(int(severity), 0), 4)]}:{category}:{logid}, {location}] {message}\n")

    setter(forward, 2)
    try:
        yield
    finally:
        setter(None)


class _DropExpected(logging.Filter):
    def __init__(self, patterns: Sequence[str]):
        super().__init__()
        self.patterns = tuple(patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname:
            return True
        msg = record.getMessage()
        return not any(p in msg for p in self.patterns)


@contextlib.contextmanager
def expected_quantizer_logs(patterns: Sequence[str] = EXPECTED_QUANTIZER_LOGS):
    """Drop ``onnxruntime.quantization``'s expected root-logger warnings (``patterns``) while the block runs."""
    root = logging.getLogger()
    drop = _DropExpected(patterns)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def ort_method(name: str):
    """ONNX Runtime's ``CalibrationMethod`` for ``minmax``, ``percentile`` or ``entropy``."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


class BatchReader:
    """An ONNX Runtime CalibrationDataReader over a preprocessed batch, in chunks the model accepts."""

    def __init__(self, batch: np.ndarray, input_name: str, chunk: int, fixed: bool, tasks: tuple | None = None):
        self.items = []
        for i in range(0, len(batch), chunk):
            x = batch[i : i + chunk]
            if fixed and len(x) < chunk:  # a fixed-batch model: pad by repeating the last image
                x = np.concatenate([x, np.repeat(x[-1:], chunk - len(x), axis=0)])
            item = {input_name: np.ascontiguousarray(x, dtype=np.float32)}
            if tasks:  # multi-task model (task input name, K): tasks round-robin, every task's adapters calibrated
                item[tasks[0]] = mixed_task_ids(len(x), tasks[1], offset=i)
            self.items.append(item)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def __len__(self):
        return len(self.items)

    def rewind(self):
        self.i = 0

    def done(self) -> bool:
        return self.i >= len(self.items)


class _Slice:
    """At most ``n`` more items of a reader: ONNX Runtime's calibrators hold every intermediate output of
    one ``collect_data`` call in memory (and the histogram ones copy them again), so atexport feeds them
    a slice at a time; the collected ranges and histograms merge across calls."""

    def __init__(self, reader: BatchReader, n: int):
        self.reader, self.left = reader, n

    def get_next(self):
        if self.left <= 0:
            return None
        self.left -= 1
        return self.reader.get_next()


@dataclass(frozen=True)
class CalibrationSettings:
    """How the activation ranges are measured; with the model and the images, what the ranges depend on.

    Attributes:
        method: ``minmax``, ``percentile`` or ``entropy``.
        symmetric: symmetric histogram ranges (TensorRT's zero points 0).
        percentile: the percentile kept by ``percentile``.
        num_bins, num_quantized_bins: histogram bins (``percentile``, ``entropy``) and the target bins
            (``entropy``).
        collect_images: images per ``collect_data`` call (bounds the calibrators' memory).
        op_types: the op types whose inputs are calibrated (``None``: every op).
    """

    method: str = "minmax"
    symmetric: bool = True
    percentile: float = 99.99
    num_bins: int = 2048
    num_quantized_bins: int = 128
    collect_images: int = 32
    op_types: tuple | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise BadInputError(f"--calib-method {self.method}: expected one of {METHODS}.")
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))

    @classmethod
    def from_preset(cls, method: str, symmetric: bool, op_types, ccfg: Mapping) -> "CalibrationSettings":
        """The settings of ``method`` with the numbers of the preset's ``calibration`` section."""
        return cls(method=method, symmetric=bool(symmetric), percentile=float(ccfg.get("percentile", 99.99)),
                   num_bins=int(ccfg.get("num_bins", 2048)),
                   num_quantized_bins=int(ccfg.get("num_quantized_bins", 128)),
                   collect_images=int(ccfg.get("collect_images", 32)), op_types=op_types)

    def cache_settings(self) -> dict:
        """What the ranges depend on besides the model and the images (part of the cache key): the
        numbers that ``method`` uses, ``None`` for the others."""
        import onnxruntime

        method = self.method
        return {
            "method": method,
            "calibrated_ops": list(self.op_types) if self.op_types else "all",
            "symmetric_histogram": self.symmetric,
            "percentile": self.percentile if method == "percentile" else None,
            "num_bins": self.num_bins if method != "minmax" else None,
            "num_quantized_bins": self.num_quantized_bins if method == "entropy" else None,
            "collect_images": self.collect_images if method != "minmax" else None,
            "onnxruntime": onnxruntime.__version__,
        }


def calibrate(model_path: str, batch: np.ndarray, settings: CalibrationSettings, *, input_name: str,
              fixed_batch: int | None, tasks: tuple | None = None, log=None) -> dict:
    """Run ONNX Runtime's calibrator and return its tensor ranges as a JSON-able document.

    The histogram methods get ``num_bins`` explicitly: ``quantize_static`` cannot pass it, and with the
    default 128 bins (= ``num_quantized_bins``) Entropy silently degenerates to MinMax. Images are fed
    ``settings.collect_images`` at a time (see :class:`_Slice`): in one call, percentile calibration of vit_small
    at 224 px on 256 images held over 22 GB and was killed for memory on a 24 GB machine. Progress: a bar
    with ETA on a terminal, else a line through ``log`` every few seconds.
    """
    from atexport.utils.progress import Progress

    from onnxruntime.quantization.calibrate import CalibrationCacheEncoder, create_calibrator

    method = settings.method
    extra = {"symmetric": bool(settings.symmetric)}
    if method == "percentile":
        extra.update(num_bins=int(settings.num_bins), percentile=float(settings.percentile))
    elif method == "entropy":
        extra.update(num_bins=int(settings.num_bins), num_quantized_bins=int(settings.num_quantized_bins))
    with tempfile.TemporaryDirectory(prefix="atexport-calib-") as tmp, expected_ort_messages(), \
            expected_quantizer_logs():
        calibrator = create_calibrator(
            Path(model_path),
            list(settings.op_types) if settings.op_types else [],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=ort_method(method),
            extra_options=extra,
        )
        chunk = fixed_batch or 8
        reader = BatchReader(batch, input_name, chunk, fixed_batch is not None, tasks)
        per_call = max(1, int(settings.collect_images) // chunk)
        # The histogram calibrators print progress ("Collecting tensor data ...") to stdout; keep the
        # command's stdout for its results.
        steps = -(-len(batch) // (chunk * per_call))
        with Progress(steps, "calibrate", log=log, unit="step", every_s=5.0, mode=None if log else "off") as bar:
            with contextlib.redirect_stdout(io.StringIO()):
                while not reader.done():
                    calibrator.collect_data(_Slice(reader, per_call))
                    bar.update(1, postfix=f"{min(reader.i * chunk, len(batch))}/{len(batch)} images")
                ranges = calibrator.compute_data()
        del calibrator
    return json.loads(json.dumps(ranges.to_dict(), cls=CalibrationCacheEncoder))
