"""One ``swap`` for every kind of model: the entry point ``atexport swap`` and Python users call.

It sits above the three ways a task is put into a model, so none of them imports another: a separable ONNX
model is rewritten (:func:`atexport.export.swap.swap_onnx`), a refittable TensorRT engine refitted
(:func:`atexport.export.tensorrt.refit_engine`, which itself swaps the engine's ONNX model), and an
on-device model (LiteRT ``.tflite``, ExecuTorch ``.pte``) gets a new task file
(:func:`atexport.export.edge_swap.swap_edge`). The file's suffix chooses.
"""

from __future__ import annotations

import os
from pathlib import Path

from atexport.errors import BadInputError
from atexport.export.swap import swap_onnx


def swap(model: str | os.PathLike, ckpt, output: str | os.PathLike | None = None, *, task_name: str | None = None,
         verify: bool = False, backbone_weights=None, images=None, log=None):
    """Put another task into a model: rewrite a separable ONNX model (:func:`swap_onnx`), refit a
    refittable TensorRT engine (:func:`atexport.export.tensorrt.refit_engine`) or write an on-device model's
    task file (:func:`atexport.export.edge_swap.swap_edge`), chosen by the file's kind.

    Raises:
        BadInputError: an unknown model kind, or options that do not apply to it (``verify``,
            ``backbone_weights`` and ``images`` are for ONNX models: an engine refit is always parity-checked).
    """
    from atexport.runtime.model import ENGINE_SUFFIXES

    suffix = Path(model).suffix.lower()
    if suffix == ".onnx":
        return swap_onnx(model, ckpt, output, task_name=task_name, verify=verify, backbone_weights=backbone_weights,
                         images=images)
    if suffix in ENGINE_SUFFIXES:
        given = [f for f, v in (("--verify", verify), ("--backbone-weights", backbone_weights), ("--images", images)) if v]
        if given:
            raise BadInputError(f"{', '.join(given)} apply to ONNX models; an engine refit checks its parity itself.")
        from atexport.export.tensorrt import refit_engine

        return refit_engine(model, ckpt, output, task_name=task_name, log=log)
    if suffix in (".tflite", ".pte"):
        from atexport.export.edge_swap import swap_edge

        return swap_edge(model, ckpt, output, task_name=task_name, verify=verify, backbone_weights=backbone_weights,
                         images=images)
    raise BadInputError(f"{model}: unknown model kind {suffix!r}; swap takes a separable .onnx, .tflite or .pte "
                        f"model or a refittable engine ({', '.join(ENGINE_SUFFIXES)}).")
