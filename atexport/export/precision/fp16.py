"""FP16 mixed precision: ONNX Runtime's float16 converter with LayerNorm and Softmax kept in FP32.

:func:`to_fp16` uses ``onnxruntime.transformers.float16`` (the same algorithm as onnxconverter-common's)
with a block list: ``LayerNormalization`` and ``Softmax`` stay FP32 (ViT residual streams reach
|x| ~ 1e3, so x^2 overflows FP16), graph inputs and outputs stay FP32. A separable model's swappable
tensors stay FP32 overridable initializers, cast to FP16 inside the graph, so ``atexport swap`` works
unchanged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Sequence

from atexport.errors import AtexportError, BadInputError, require
from atexport.export.precision.common import (
    PrecisionResult,
    carry_over,
    load_precision_config,
    prepare_output,
    read_fp32,
)
from atexport.export.precision.options import ParityCheck
from atexport.export.precision.verified import finish
from atexport.export.precision.inspect import check_fp16_graph, fp16_report, producers, toposort


def to_fp16(
    onnx_in,
    onnx_out=None,
    *,
    block_ops: Sequence[str] | None = None,
    keep_io_types: bool | None = None,
    verify: bool = True,
    reference=None,
    images=None,
    config: str | Mapping = "precision",
    log=None,
) -> PrecisionResult:
    """Convert an FP32 atexport ONNX model to FP16 mixed precision, check parity, write it atomically.

    Args:
        onnx_in: the FP32 model (path or ``onnx.ModelProto``) exported by ``atexport onnx``.
        onnx_out: output path; default ``<stem>.fp16.onnx`` beside the input.
        block_ops: op types kept in FP32 (default from ``export_configs/precision.yaml``:
            LayerNormalization, Softmax).
        keep_io_types: keep graph inputs and outputs FP32 (default: on), so apps feed float32 as before.
        verify: check parity against ``reference`` on real photos (on by default).
        reference: a runner to compare against (e.g. a :class:`~atexport.runtime.torch.TorchRunner` on the
            PyTorch model); default: the FP32 input model in ONNX Runtime, itself verified against
            PyTorch at export.
        images: extra real images for parity (a folder or list).
        config: precision preset name in ``export_configs/`` or a dict.
        log: optional callable receiving progress lines.

    Raises:
        BadInputError: unreadable input, input without atexport metadata or not FP32, bad output path.
        ParityError: outside the fp16 tolerance; the model is kept at ``<stem>.failed.onnx``.
    """
    say = log or (lambda *_: None)
    require("onnxruntime", "converting ONNX models to FP16 (onnxruntime.transformers.float16)", "onnx")

    cfg = load_precision_config(config)
    f16 = cfg["fp16"]
    t_start = time.perf_counter()
    src, where, meta = read_fp32(onnx_in)
    out = prepare_output(onnx_in, onnx_out, "fp16")
    block = list(block_ops if block_ops is not None else f16.get("block_ops", ["LayerNormalization", "Softmax"]))
    keep_io = bool(f16.get("keep_io_types", True) if keep_io_types is None else keep_io_types)

    say(f"converting to FP16 (kept in FP32: {', '.join(block)}) ...")
    t0 = time.perf_counter()
    converted, held, nodes = _convert(src, meta, f16, block, keep_io)
    seconds = {"convert": time.perf_counter() - t0}
    _check_fp16_model(converted, block)

    report = fp16_report(converted)
    report["recipe"] = (f"onnxruntime float16, FP32: {', '.join(block)}"
                        + (f" + {len(nodes)} named nodes" if nodes else ""))
    if held:
        report["swappable"] = f"{len(held)} tensors kept FP32 overridable initializers, cast to FP16 in the graph"
    import onnxruntime

    meta.precision = "fp16"
    meta.extra = dict(meta.extra or {})
    meta.extra["precision"] = {
        "precision": "fp16",
        "tool": f"onnxruntime.transformers.float16 (onnxruntime {onnxruntime.__version__})",
        "block_ops": block,
        "block_nodes": nodes,
        "keep_io_types": keep_io,
        "swappable": "fp32 inputs, cast to fp16 in the graph" if held else None,
        "graph": report,
        "source_model": Path(where).name if isinstance(onnx_in, (str, os.PathLike)) else None,
        "config_source": cfg.get("_source"),
    }
    carry_over(converted, src)
    result = PrecisionResult(path=None, precision="fp16", metadata=meta, graph=report, seconds=seconds)
    finish(converted, meta, out, result, src, ParityCheck(verify=verify, reference=reference, images=images,
                                                          parity=cfg["parity"], say=say))
    result.seconds["total"] = time.perf_counter() - t_start
    return result


def _convert(src, meta, f16: Mapping, block: list[str], keep_io: bool):
    """ONNX Runtime's float16 converter on a copy of ``src``; returns the converted model, the swappable
    initializers held out of the conversion (FP32, put back) and the nodes kept FP32 by rule."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.ModelProto()
    model.CopyFrom(src)
    # Swappable tensors: take their initializers out so the converter sees plain FP32 graph inputs
    # (kept FP32, cast to FP16 inside the graph), then put the FP32 values back.
    swappable = [e.get("initializer", k) for k, e in (meta.manifest or {}).items()]
    held = {i.name: i for i in model.graph.initializer if i.name in set(swappable)}
    if held:
        keep = [i for i in model.graph.initializer if i.name not in held]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        if not keep_io:
            raise BadInputError("a separable model keeps its swappable tensors FP32; keep_io_types=False is refused.")
    nodes = _fp16_node_block_list(model, f16)
    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(block)),
        node_block_list=nodes,
        max_finite_val=float(f16.get("max_finite_val", 65504.0)),
        min_positive_val=float(f16.get("min_positive_val", 5.96e-08)),
    )
    if held:
        converted.graph.initializer.extend(held.values())
    toposort(converted)  # the converter appends its input casts last; checkers and TensorRT need order
    return converted, held, nodes


def _check_fp16_model(converted, block: list[str]) -> None:
    """The FP16 model passes ``onnx.checker`` and keeps the FP32 block list (else a bug)."""
    import onnx

    try:
        onnx.checker.check_model(converted, full_check=False)
    except Exception as e:
        raise AtexportError(f"the FP16 model fails onnx.checker ({str(e).splitlines()[0][:300]}); a bug.") from e
    problems = check_fp16_graph(converted, block)
    if problems:
        raise AtexportError(f"the FP16 conversion did not keep the FP32 block list: {'; '.join(problems[:5])} (a bug).")


def _fp16_node_block_list(model, f16: dict) -> list[str]:
    """Named nodes kept FP32 by rule: ``adapter_residual: fp32`` keeps the Adds that add an adapter's
    output to the residual stream (``x + up(gelu(down(x)))``) in FP32."""
    if str(f16.get("adapter_residual", "fp16")).lower() != "fp32":
        return []
    prod = producers(model)
    out = []
    for n in model.graph.node:
        if n.op_type != "Add":
            continue
        for i in n.input:
            p = prod.get(i)
            if p is not None and p.op_type == "Add" and any(".adapter.up." in x for x in p.input):
                out.append(n.name)
                break
    return out
