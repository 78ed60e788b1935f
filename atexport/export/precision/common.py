"""What FP16 and INT8 conversion share: the result, the preset, reading the FP32 input, parity, the write.

Both conversions read an FP32 atexport ONNX model (refusing any other), decide an output path beside it,
write the atexport metadata into the converted model, check its parity against a reference (the FP32
model in ONNX Runtime by default, or a given runner such as the PyTorch model), and write it with
:func:`atexport.export.write.write_verified`: atomically when parity passes, else as ``.failed.onnx``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atexport import configs
from atexport.artifact.bank import task_input
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


# --------------------------------------------------------------------------------------------------
# Parity and the write
# --------------------------------------------------------------------------------------------------


def judged_images(meta, images, holdout=None, holdout_name: str | None = None, max_images: int | None = None):
    """The in-domain images a precision check judges, and their row name: a calibration set's held-out
    images and the user's ``images`` (a folder or a list), or ``(None, "")`` when there are none."""
    from atexport.parity import photo_batch

    parts, names = [], []
    if holdout is not None and len(holdout):
        parts.append(np.ascontiguousarray(holdout, np.float32))
        names.append(f"held-out {holdout_name}" if holdout_name else "held-out")
    if images is not None:
        parts.append(photo_batch(meta.preprocess, extra=images, max_images=max_images, samples=False))
        names.append("images")
    if not parts:
        return None, ""
    return np.concatenate(parts), " + ".join(names)


def precision_parity(data: bytes, src_model, meta, precision: str, reference, images, par: dict, say,
                     holdout=None, holdout_name: str | None = None):
    """Parity of ``data`` against ``reference`` (a Runner) or, by default, the FP32 ONNX model in ORT.

    In-domain images (``holdout``: the calibration set's held-out images; ``images``: the user's) are
    judged; photos and random inputs are then smoke checks (see :func:`atexport.parity.check_parity`).
    """
    from atexport.parity import check_parity, photo_batch
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    ref_label = "onnx-fp32"
    if reference is None:
        reference = OnnxRuntimeRunner(src_model.SerializeToString(), name="onnx-fp32")
    else:
        ref_label = getattr(reference, "name", "reference")
    in_shape = [int(v) for v in meta.preprocess["input_size"]]
    photos = photo_batch(meta.preprocess, max_images=par.get("max_images"))
    judged, judged_name = judged_images(meta, images, holdout, holdout_name)
    batch = meta.input["shape"][0]
    sizes = [int(batch)] if isinstance(batch, int) else [int(b) for b in par.get("batch_sizes", [1, 4])]
    what = f"{len(judged)} in-domain images ({judged_name}) and {len(photos)} photos" if judged is not None \
        else f"{len(photos)} photos"
    say(f"checking {precision} parity against {ref_label} on {what} ...")
    with reference as ref, OnnxRuntimeRunner(data, name=f"onnx-{precision}", optimization=par.get("optimization", "all")) as cand:
        pairs = [("", ref, cand)]
        if task_input(meta):  # multi-task model: every task on its own (its task_id fed, its logits only)
            from atexport.runtime.tasks import task_runners

            pairs = [(f" {t['name']}", r, c) for (t, r), (_, c) in zip(task_runners(meta, ref), task_runners(meta, cand))]
        rows = []
        for suffix, r, c in pairs:
            rows += check_parity(
                r, c, photos, precision, judged=judged, judged_name=judged_name,
                random_inputs=per_precision(par.get("random_inputs", 0), precision),
                input_shape=in_shape, seed=int(par.get("seed", 0)), batch_sizes=sizes,
                tolerances=par.get("tolerances", "tolerances"), label=precision + suffix,
            )
    return rows, ref_label


def per_precision(value, precision: str) -> int:
    """A config value given once or per precision (``{fp16: 8, int8: 8}``)."""
    if isinstance(value, Mapping):
        value = value.get(precision, 0)
    return int(value or 0)


def finish(model, meta, output, result: PrecisionResult, *, verify: bool, src_model, reference, images,
           par: dict, say, holdout=None, holdout_name: str | None = None) -> PrecisionResult:
    """Write the metadata into ``model``, check parity, then write ``output`` (or ``.failed.onnx`` and raise)."""
    from atexport.artifact.metadata import write_onnx_metadata
    from atexport.export.write import write_verified

    precision = result.precision
    write_onnx_metadata(model, meta)
    if verify:
        t0 = time.perf_counter()
        result.parity, result.reference = precision_parity(model.SerializeToString(), src_model, meta, precision,
                                                           reference, images, par, say, holdout, holdout_name)
        result.seconds["verify"] = time.perf_counter() - t0
        meta.extra.setdefault("precision", {})["parity"] = [r.to_dict() for r in result.parity]
        meta.extra["precision"]["reference"] = result.reference
        write_onnx_metadata(model, meta)
    what = f"the {precision} model does not match {result.reference} within the {precision} tolerances"
    if verify and not result.passed:
        what += _where_it_breaks(model, src_model, meta, precision, images, holdout, par)
    result.path = write_verified(model.SerializeToString(), output, result.parity, what, verify=verify,
                                 failed_path=failed_path_for(output), result=result)
    return result


def _where_it_breaks(model, src_model, meta, precision: str, images, holdout, par: dict) -> str:
    """``"; <sentence naming the first bad layer>"`` for a model that failed parity, or ``""``."""
    from atexport.export.precision.locate import locate_break
    from atexport.parity import photo_batch

    batch, _ = judged_images(meta, images, holdout)
    if batch is None:
        batch = photo_batch(meta.preprocess, max_images=8)
    where = locate_break(src_model, model, batch, precision, tolerances=par.get("tolerances", "tolerances"),
                         tasks=task_input(meta))
    return f"; {where.rstrip('.')}" if where else ""
