"""Parity of a built or refitted engine: against PyTorch, or an ONNX model in ONNX Runtime, per task.

:func:`verify_engine` is the one check every engine goes through, after a build (``atexport trt``) and after
every refit (``atexport swap --engine``), with the precision's tolerances and the photo batches every other
export uses (:mod:`atexport.parity`). It runs only where TensorRT and a GPU exist.
"""

from __future__ import annotations

import os


def verify_engine(engine_path: str | os.PathLike, reference, onnx_reference: str | os.PathLike, meta, precision: str, *,
                  images=None, log=None, batch_range: tuple[int, int] | None = None) -> list:
    """Parity rows of an engine against ``reference`` (a runner, usually PyTorch) or ``onnx_reference`` in ORT.

    Args:
        engine_path: the engine (with its sidecar).
        reference: a runner to compare with; ``None`` (and always for a multi-task engine, checked task by
            task) compares with ``onnx_reference`` in ONNX Runtime.
        onnx_reference: the ONNX model compared with when ``reference`` is not used.
        meta: the model's metadata (input shape, tasks, preprocessing).
        precision: which tolerance row applies.
        images: extra real images for the photo batch.
        log: optional callable receiving progress lines.
        batch_range: the engine profile's ``(min, max)`` batch; the checked batch sizes stay inside it.
    """
    from atexport.export.precision import load_precision_config
    from atexport.parity import ParitySettings, check_parity, photo_batch
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.tensorrt import TensorRTRunner

    par = load_precision_config()["parity"]
    if reference is None or meta.tasks:  # a multi-task engine is checked against its own ONNX model, task by task
        reference = OnnxRuntimeRunner(str(onnx_reference), name=f"onnx {os.path.basename(str(onnx_reference))}")
    from atexport.export.precision.calibration import holdout_for
    from atexport.export.precision.verified import judged_images

    photos = photo_batch(meta.preprocess, max_images=par.get("max_images"))
    judged, judged_name = judged_images(meta, images, *holdout_for(meta, log))
    b = meta.input["shape"][0]
    sizes = [int(b)] if isinstance(b, int) else [int(x) for x in par.get("batch_sizes", [1, 4])]
    if batch_range is not None:
        sizes = [s for s in sizes if batch_range[0] <= s <= batch_range[1]] or [int(batch_range[0])]
    ri = par.get("random_inputs", 0)
    ri = int(ri.get(precision, 0) if isinstance(ri, dict) else ri)
    (log or (lambda *_: None))(f"checking the engine's parity against {getattr(reference, 'name', 'reference')} ...")
    with reference as ref, TensorRTRunner(engine_path, log=log) as cand:
        pairs = [("", ref, cand)]
        if meta.tasks:  # multi-task engine: every task on its own (its task_id fed, its logits only)
            from atexport.runtime.tasks import task_runners

            pairs = [(f" {t['name']}", r, c) for (t, r), (_, c) in zip(task_runners(meta, ref), task_runners(meta, cand))]
        rows = []
        for suffix, r, c in pairs:
            rows += check_parity(r, c, photos, precision, judged=judged, judged_name=judged_name,
                                 label=f"trt {precision}{suffix}", settings=ParitySettings(
                                     random_inputs=ri, input_shape=[int(v) for v in meta.preprocess["input_size"]],
                                     batch_sizes=sizes))
        return rows


def keep_failed(engine_path, sidecar_file, rows, what: str) -> None:
    """Move a failing engine and its sidecar to ``*.failed.engine`` and raise the parity table.

    Raises:
        ParityError: always (``rows`` hold a failure).
    """
    from pathlib import Path

    from atexport.artifact.sidecar import sidecar_path
    from atexport.errors import ParityError
    from atexport.parity.compare import format_table

    engine_path = Path(engine_path)
    failed = engine_path.with_name(engine_path.stem + ".failed" + engine_path.suffix)
    os.replace(engine_path, failed)
    if Path(sidecar_file).is_file():
        os.replace(sidecar_file, sidecar_path(failed))
    raise ParityError(f"{what} does not match the reference within the tolerances:\n{format_table(rows)}\n"
                      f"The failing engine is kept at {failed}.")
