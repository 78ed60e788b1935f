"""What FP16 and INT8 conversion share: the result, the preset, reading the FP32 input, parity, the write.

Both conversions read an FP32 atexport ONNX model (refusing any other), decide an output path beside it
and carry its metadata over; :mod:`atexport.export.precision.verified` then checks the converted model's
parity and writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from atexport import configs
from atexport.errors import BadInputError

PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("tensorrt", "cpu")
METHODS = ("minmax", "percentile", "entropy")
OP_POLICIES = ("linear", "all")
LINEAR_OPS = ("MatMul", "Gemm")


@dataclass
class PrecisionResult:
    """What :func:`~atexport.export.precision.to_fp16` or :func:`~atexport.export.precision.quantize_int8` produced.

    Attributes:
        path: the written model (``None`` when parity failed).
        precision: ``fp16`` or ``int8``.
        metadata: the metadata written into it.
        parity: parity rows against the reference (empty when not verified).
        reference: what the parity reference was (``pytorch`` or ``onnx-fp32``).
        graph: a summary of the graph (ops kept in FP32, Q/DQ placement).
        calibration: calibration set, image count and whether the cache was reused (INT8).
        seconds: wall time per step.
        failed_path: where a model that failed parity was kept.
    """

    path: Path | None
    precision: str
    metadata: Any
    parity: list = field(default_factory=list)
    reference: str | None = None
    graph: dict = field(default_factory=dict)
    calibration: dict | None = None
    seconds: dict = field(default_factory=dict)
    failed_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.parity)

    def summary(self) -> str:
        g = self.graph
        lines = [f"precision:  {self.precision} ({g.get('recipe', '')})"]
        if self.precision == "fp16":
            kept = ", ".join(f"{k} {v['fp32']}/{v['total']}" for k, v in g.get("kept_fp32", {}).items())
            lines.append(f"fp32 ops:   {kept or 'none'}; {g.get('fp16_nodes', 0)} of {g.get('nodes', 0)} nodes compute in FP16")
        if self.precision == "int8":
            lines += self._int8_lines()
        if g.get("swappable"):
            lines.append(f"swappable:  {g['swappable']}")
        lines.append("time:       " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def _int8_lines(self) -> list[str]:
        g, lines = self.graph, []
        q = g.get("qdq", {})
        cons = ", ".join(f"{k} {v}" for k, v in q.get("quantized_nodes", {}).items())
        lines.append(f"quantized:  {cons or 'nothing'} ({q.get('QuantizeLinear', 0)} Q, {q.get('DequantizeLinear', 0)} DQ)")
        c = self.calibration or {}
        if c:
            lines.append(
                f"calibrated: {c.get('name')} ({c.get('images')} images, {c.get('method')}), "
                f"cache {c.get('cache_status')} [{c.get('cache')}]"
            )
        sm = g.get("smoothed")
        if sm is not None:
            done = sm["smoothed"]
            shown = ", ".join(f"{d['layer']} ({d['ratio']:g}x)" for d in done[:6]) + (
                f" and {len(done) - 6} more" if len(done) > 6 else "")
            lines.append(f"smoothed:   {len(done)} LayerNorms (SmoothQuant alpha {sm['alpha']:g}, where channel max/median "
                         f">= {sm['min_ratio']:g}){': ' + shown if done else ': none had outlier channels'}")
            if sm["skipped"]:
                lines.append("            not smoothable: " + "; ".join(f"{k['layer']} ({k['reason']})" for k in sm["skipped"][:3])
                             + (f"; {len(sm['skipped']) - 3} more" if len(sm["skipped"]) > 3 else ""))
        kf = g.get("kept_float")
        if kf:
            shown = ", ".join(kf["layers"][:8]) + (f" and {len(kf['layers']) - 8} more" if len(kf["layers"]) > 8 else "")
            lines.append(f"float:      {len(kf['layers'])} Linear layers ({kf['requested']}; "
                         f"{kf['float_share']:.1%} of Linear MACs){': ' + shown if shown else ''}")
        return lines


def load_precision_config(config: str | Mapping = "precision") -> dict:
    """The ``export_configs/precision.yaml`` preset (or a dict of the same shape)."""
    data = dict(config) if isinstance(config, Mapping) else configs.load("export_configs", config)
    for section in ("fp16", "int8", "calibration", "parity"):
        data.setdefault(section, {})
    return data


# --------------------------------------------------------------------------------------------------
# Input and output
# --------------------------------------------------------------------------------------------------


def read_fp32(onnx_in, flag: str = "--onnx"):
    """``(model, where, metadata)`` of the FP32 input (a path or an ``onnx.ModelProto``); any other
    precision is refused: conversions start from the FP32 model ``atexport onnx`` wrote."""
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.artifact.onnx import read_onnx

    if isinstance(onnx_in, (str, os.PathLike)):
        model, where = read_onnx(onnx_in, flag), str(onnx_in)
    else:
        model, where = onnx_in, "in-memory model"
    meta = read_onnx_metadata(model, where)
    if meta.precision != "fp32":
        raise BadInputError(
            f"{where} is already a {meta.precision} model; convert the FP32 model exported by 'atexport onnx'."
        )
    return model, where, meta


def precision_path_for(onnx_in: str | os.PathLike, precision: str) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx`` beside it."""
    p = Path(onnx_in)
    return p.with_name(f"{p.stem}.{precision}.onnx")


def failed_path_for(output: str | os.PathLike) -> Path:
    """``<stem>.failed.onnx`` beside ``output`` (see :func:`atexport.artifact.onnx.failed_path_for`)."""
    from atexport.artifact.onnx import failed_path_for as _failed_path_for

    return Path(_failed_path_for(output))


def prepare_output(onnx_in, onnx_out, precision: str) -> Path:
    """The output path (default beside the input), checked writable and not the input itself."""
    from atexport.utils.io import check_writable

    if onnx_out is None:
        if not isinstance(onnx_in, (str, os.PathLike)):
            raise BadInputError("give an output path: the input model was not read from a file.")
        onnx_out = precision_path_for(onnx_in, precision)
    out = check_writable(onnx_out, "-o")
    if isinstance(onnx_in, (str, os.PathLike)) and Path(onnx_in).resolve() == out.resolve():
        raise BadInputError(f"{out}: that is the input model; choose another output path.")
    return out


def carry_over(model, src) -> None:
    """Keep the FP32 model's producer and doc string on the converted model."""
    model.producer_name = src.producer_name
    model.producer_version = src.producer_version
    model.doc_string = src.doc_string
