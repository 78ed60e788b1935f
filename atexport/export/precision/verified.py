"""The verified end of a precision conversion: parity by the one rule, then the write (or ``.failed``).

:func:`finish` writes the metadata into the converted model, checks its parity against a reference (the
FP32 model in ONNX Runtime by default, or a given runner such as the PyTorch model) on held-out in-domain
images (judged) and photos and random inputs (smoke), names the first bad layer of a model that fails
(:mod:`~atexport.export.precision.locate`), and writes it with :func:`atexport.export.write.write_verified`:
atomically when parity passes, else as ``.failed.onnx``.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from atexport.artifact.bank import task_input
from atexport.export.precision.common import PrecisionResult, failed_path_for
from atexport.export.precision.options import ParityCheck


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
    from atexport.parity import ParitySettings, check_parity, photo_batch
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
                r, c, photos, precision, judged=judged, judged_name=judged_name, label=precision + suffix,
                settings=ParitySettings(
                    random_inputs=per_precision(par.get("random_inputs", 0), precision),
                    input_shape=in_shape, seed=int(par.get("seed", 0)), batch_sizes=sizes,
                    tolerances=par.get("tolerances", "tolerances")),
            )
    return rows, ref_label


def per_precision(value, precision: str) -> int:
    """A config value given once or per precision (``{fp16: 8, int8: 8}``)."""
    if isinstance(value, Mapping):
        value = value.get(precision, 0)
    return int(value or 0)


def finish(model, meta, output, result: PrecisionResult, src_model, check: ParityCheck, holdout=None,
           holdout_name: str | None = None) -> PrecisionResult:
    """Write the metadata into ``model``, check parity, then write ``output`` (or ``.failed.onnx`` and raise).

    Args:
        model, src_model: the converted model and the FP32 model it was made from.
        meta: the converted model's metadata; result: its :class:`PrecisionResult`, completed here.
        output: where the model goes when parity passes.
        check: how parity is checked (:class:`~atexport.export.precision.options.ParityCheck`).
        holdout, holdout_name: a calibration set's held-out images (judged with ``check.images``).
    """
    from atexport.artifact.metadata import write_onnx_metadata
    from atexport.export.write import write_verified

    precision = result.precision
    write_onnx_metadata(model, meta)
    if check.verify:
        t0 = time.perf_counter()
        result.parity, result.reference = precision_parity(model.SerializeToString(), src_model, meta, precision,
                                                           check.reference, check.images, check.parity, check.say,
                                                           holdout, holdout_name)
        result.seconds["verify"] = time.perf_counter() - t0
        meta.extra.setdefault("precision", {})["parity"] = [r.to_dict() for r in result.parity]
        meta.extra["precision"]["reference"] = result.reference
        write_onnx_metadata(model, meta)
    what = f"the {precision} model does not match {result.reference} within the {precision} tolerances"
    if check.verify and not result.passed:
        what += _where_it_breaks(model, src_model, meta, precision, check.images, holdout, check.parity)
    result.path = write_verified(model.SerializeToString(), output, result.parity, what, verify=check.verify,
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
