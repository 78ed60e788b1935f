"""Writing a verified LiteRT model (``.tflite``) from an atexport checkpoint, for Android and small boards.

``atexport litert --ckpt run.pt [--separable] [--precision fp32|int8|int8-full [--calib SET]]`` rebuilds the trained model,
converts it with ``litert_torch.convert`` (``torch.export`` to LiteRT, no TensorFlow), runs the result in
LiteRT's interpreter (:class:`~atexport.runtime.litert.LiteRTRunner`, the runtime an app uses) against
PyTorch on real photos, and writes it only when every parity row passes (:mod:`atexport.export.edge`):

* ``fp32``: float rounding (the ``fp32`` row of ``export_configs/tolerances.yaml``);
* ``int8``: *dynamic-range* quantization with ``ai_edge_quantizer`` (weights INT8, activations float,
  quantized per channel at run time; ``dynamic_wi8_afp32``), held to the ``int8`` row. In a separable model
  the task's tensors are inputs and stay float; the backbone's weights are quantized.
* ``int8-full``: *full-integer* (static) quantization with ``ai_edge_quantizer``'s ``static_wi8_ai8``
  recipe (weights INT8 per channel, activations INT8 per tensor with ranges measured on an atexport
  calibration set, ``--calib``, through the model's own preprocessing), held to the ``int8`` row and judged
  on the set's held-out images. The graph's input and output stay float (the recipe leaves the virtual
  ``INPUT``/``OUTPUT`` ops unquantized, so a QUANTIZE op follows the image and a DEQUANTIZE op precedes
  the logits): the runtime's preprocessing and logits are unchanged. It loses more than dynamic-range
  (issue #21) and fused models only: a separable model's task tensors are inputs whose ranges would be
  fixed to the exported task's.

Beside ``model.tflite`` go ``model.tflite.json`` (the metadata sidecar, :mod:`atexport.artifact.edge`;
``extra.litert`` records the signature, its image, logits and weight inputs, the converter versions) and,
for a separable model, ``model.tflite.task.npz`` (the exported task's tensors, fed when no other task is
selected).
"""

from __future__ import annotations

import contextlib
import io
import os
import time

from atexport.errors import BadInputError, require
from atexport.export.edge import EdgeOptions, EdgeResult

PRECISIONS = ("fp32", "int8", "int8-full")


def _convert(module, example) -> bytes:
    """``litert_torch.convert`` to ``.tflite`` bytes (its progress lines are kept off stdout)."""
    import tempfile
    from pathlib import Path

    litert_torch = require("litert_torch", "converting models to LiteRT (.tflite)", "litert-export")
    with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as tmp:
        edge = litert_torch.convert(module, tuple(example))
        path = Path(tmp) / "model.tflite"
        edge.export(str(path))
        return path.read_bytes()


def quantize_dynamic_range(data: bytes) -> bytes:
    """Dynamic-range INT8 (``ai_edge_quantizer``'s ``dynamic_wi8_afp32`` recipe) of a float ``.tflite``."""
    require("ai_edge_quantizer", "quantizing LiteRT models", "litert-export")
    from ai_edge_quantizer import quantizer, recipe

    with contextlib.redirect_stdout(io.StringIO()):
        qt = quantizer.Quantizer(bytearray(data))
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        return bytes(qt.quantize().quantized_model)


def quantize_full_integer(data: bytes, calib_batch, image_input: str = "args_0", threads: int | None = None) -> bytes:
    """Full-integer INT8 (``ai_edge_quantizer``'s ``static_wi8_ai8`` recipe) of a float ``.tflite``, activation
    ranges measured on ``calib_batch`` (float32 NCHW, fed one image at a time: the model's batch is 1).

    The virtual ``INPUT`` and ``OUTPUT`` ops are left unquantized, so the model keeps a float image input and
    float logits (quantize / dequantize ops inside the graph).
    """
    import warnings

    require("ai_edge_quantizer", "quantizing LiteRT models", "litert-export")
    from ai_edge_quantizer import quantizer, recipe

    from atexport.runtime.litert import SIGNATURE

    rules = list(recipe.static_wi8_ai8())
    rules += [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in ("INPUT", "OUTPUT")]
    samples = [{image_input: calib_batch[i: i + 1]} for i in range(len(calib_batch))]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibrator's interpreter keeps all tensors, and says so
        qt = quantizer.Quantizer(bytearray(data))
        qt.load_quantization_recipe(rules)
        ranges = qt.calibrate({SIGNATURE: samples}, num_threads=int(threads or os.cpu_count() or 1))
        return bytes(qt.quantize(ranges, enable_progress_bar=False).quantized_model)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def export_litert(ckpt, output: str | os.PathLike | None = None, *, separable: bool = False, precision: str = "fp32",
                  calib=None, calib_count: int | None = None, verify: bool = True, task_name: str | None = None,
                  options: EdgeOptions | None = None, log=None) -> EdgeResult:
    """Convert a checkpoint to a verified LiteRT ``.tflite`` (batch 1), written atomically with its sidecar.

    Args:
        ckpt: a ``run.pt`` path or a loaded :class:`~atexport.checkpoint.Checkpoint`.
        output: the ``.tflite`` to write; default ``<checkpoint stem>.tflite`` beside the checkpoint.
        separable: adapter and head tensors as signature inputs (swappable tasks, see the module docstring).
        precision: ``fp32``, ``int8`` (dynamic-range) or ``int8-full`` (full-integer, calibrated on ``calib``).
        calib: ``int8-full`` only (required there): the calibration set (a name in ``calibration/``, a YAML
            path or a folder of images); its held-out images are the judged parity row.
        calib_count: how many calibration images (default: the set's).
        verify: check parity against PyTorch before writing (on by default).
        task_name: the task's name in the metadata (default: the checkpoint's).
        options: :class:`~atexport.export.edge.EdgeOptions`: extra parity ``images``, LiteRT ``threads`` for the
            check, local ``backbone_weights``, the export preset ``config`` holding the parity settings.
        log: optional callable receiving progress lines.

    Raises:
        BadInputError: unreadable checkpoint, unknown precision, output not a ``.tflite``, ``calib`` without
            ``int8-full`` or ``int8-full`` without ``calib`` or with ``separable``.
        IncompatibleCheckpointError: fingerprint mismatch, ``separable`` with a full fine-tune.
        MissingDependencyError: litert-torch or ai-edge-litert is not installed (``pip install 'atexport[litert-export]'``).
        ParityError: outside the tolerance; kept at ``<stem>.failed.tflite`` (with its sidecar), nothing at ``output``.
    """
    from atexport.export.edge import check_runner, edge_metadata, module_to_convert, own_task_bytes, prepare, write_edge
    from atexport.runtime.litert import LiteRTRunner, require_litert

    say = log or (lambda *_: None)
    opts = options if options is not None else EdgeOptions()
    t_start = time.perf_counter()
    precision = _check_flags(precision, calib, calib_count, separable)
    require("litert_torch", "converting models to LiteRT (.tflite)", "litert-export")
    require_litert()
    em = prepare(ckpt, output, ".tflite", separable=separable, images=opts.images, task_name=task_name,
                 backbone_weights=opts.backbone_weights, config=opts.config)
    say(f"converting {em.ckpt.model.backbone} to LiteRT ({'separable' if em.names else 'fused'}, {precision}) ...")
    t0 = time.perf_counter()
    data = _convert(module_to_convert(em), em.example)
    seconds = {"convert": time.perf_counter() - t0}
    calib_desc, held_out, held_name = None, None, None
    if precision == "int8":
        t0 = time.perf_counter()
        data = quantize_dynamic_range(data)
        seconds["quantize"] = time.perf_counter() - t0
    elif precision == "int8-full":
        data, calib_desc, held_out, held_name = _full_integer(data, em, (calib, calib_count), opts.threads, say,
                                                              seconds)
    row = "int8" if precision.startswith("int8") else precision  # metadata precision and tolerance row
    meta = edge_metadata(em, "litert", row, _record(em, precision, calib_desc))
    result = EdgeResult(path=None, format="litert", precision=precision, metadata=meta, seconds=seconds)
    if verify:
        t0 = time.perf_counter()
        runner = LiteRTRunner(data, threads=opts.threads, metadata=meta, name=f"litert-{precision}")
        result.parity = check_runner(em, runner, row, f"litert {precision}", say, judged=held_out,
                                     judged_name=held_name or "held-out")
        seconds["verify"] = time.perf_counter() - t0
    write_edge(data, result, em.output, verify=verify, t_start=t_start, extra_files=own_task_bytes(em))
    return result


def _check_flags(precision: str, calib, calib_count, separable: bool) -> str:
    """The precision (lower case), refusing calibration flags where they do not apply."""
    from atexport.export.edge import refuse_precision

    precision = refuse_precision(precision, PRECISIONS)
    full = precision == "int8-full"
    if not full and (calib is not None or calib_count is not None):
        raise BadInputError(f"--calib applies to --precision int8-full (static activation ranges); {precision} "
                            "needs no calibration set.")
    if full and calib is None:
        raise BadInputError("--precision int8-full needs a calibration set: give --calib NAME|DIR|YAML "
                            "(e.g. --calib digits, or a folder of the task's images).")
    if full and separable:
        raise BadInputError("--precision int8-full is for fused models: a --separable model's task tensors are "
                            "inputs, and static ranges would fix them to the exported task's.")
    return precision


def _full_integer(data: bytes, em, calib_spec, threads, say, seconds: dict):
    """Full-integer quantization calibrated on the set ``calib_spec`` (``(calib, count)``); returns the model,
    the set's description and its held-out images with their row name."""
    from atexport.export.precision.calibration import load_calibration_set

    calib, calib_count = calib_spec
    cs = load_calibration_set(calib, count=calib_count)
    say(f"loading calibration images ({cs.name}: {cs.source}, up to {cs.count}) ...")
    calib_batch, calib_desc = cs.batch(em.ckpt.preprocess), cs.to_dict()
    held_out, held_name = cs.batch(em.ckpt.preprocess, "holdout"), f"held-out {cs.name}"
    say(f"full-integer quantization, calibrated on {len(calib_batch)} images ...")
    t0 = time.perf_counter()
    data = quantize_full_integer(data, calib_batch, threads=threads)
    seconds["quantize"] = time.perf_counter() - t0
    return data, calib_desc, held_out, held_name


def _record(em, precision: str, calib_desc) -> dict:
    """``extra.litert`` of the metadata: the signature, its inputs and output, the quantization, the versions."""
    from atexport.runtime.litert import SIGNATURE

    # litert_torch names the signature's inputs args_0.. in the order given and its output output_0
    return {"signature": SIGNATURE, "image_input": "args_0", "logits_output": "output_0",
            "weight_inputs": {n: f"args_{i + 1}" for i, n in enumerate(em.names)},
            "quantization": {"int8": "dynamic_wi8_afp32", "int8-full": "static_wi8_ai8 (float input and output)"}
            .get(precision), "calibration": calib_desc, "batch": 1, "versions": _versions()}
