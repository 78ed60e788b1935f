"""Explicit INT8 (Q/DQ): static quantization of the Linear layers, calibrated on the model's own inputs.

:func:`quantize_int8` uses ``onnxruntime.quantization`` static QDQ with per-channel symmetric INT8
weights, and puts Q/DQ only on the inputs and weights of the Linear layers (MatMul/Gemm with a constant
weight); the residual Adds, LayerNorm, Softmax, GELU and attention's activation-by-activation MatMuls
stay float. ``target="tensorrt"`` uses symmetric INT8 activations (zero points 0, what TensorRT accepts);
``target="cpu"`` unsigned asymmetric activations (U8S8), what ONNX Runtime's x86 kernels favour.
Calibration ranges are cached (:mod:`atexport.export.precision.calibration`); Linear layers may stay
float (:mod:`atexport.export.precision.keep_float`). A separable model's swappable tensors stay FP32
overridable initializers and the layers that use them stay unquantized, so ``atexport swap`` works.

The steps, in order: :func:`int8_options` (validate the request), :func:`calibration_batch` (images
through the model's preprocessing), :func:`activation_ranges` (calibrate or reuse the cache),
:func:`run_quantizer` (ONNX Runtime's quantizer), :func:`unshare_float_consumers`, keep-float,
:func:`check_int8_model`, then the metadata and the verified write.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from atexport.artifact.bank import task_input
from atexport.errors import AtexportError, BadInputError, require
from atexport.export.precision.common import (
    LINEAR_OPS,
    METHODS,
    TARGETS,
    PrecisionResult,
    carry_over,
    load_precision_config,
    prepare_output,
    read_fp32,
)
from atexport.export.precision.calibrate import CalibrationSettings
from atexport.export.precision.options import Int8Options, ParityCheck
from atexport.export.precision.verified import finish
from atexport.export.precision.inspect import check_int8_graph, linear_nodes, producers, prune_qdq, qdq_report
from atexport.export.precision.keep_float import (RANK_BY, SENSITIVITY_MODES, KeepFloatRequest, apply_keep_float,
                                                   parse_keep_float)


@dataclass
class Int8Request:
    """A validated INT8 request: what :func:`quantize_int8` was asked, with the preset's defaults filled in."""

    target: str
    method: str
    op_policy: str
    settings: dict  # the target's quantizer settings (int8_settings)
    keep_float: tuple  # (kind, value) from parse_keep_float
    keep_float_cfg: dict  # the preset's int8.keep_float section
    op_types: list
    smooth: float | None = None  # SmoothQuant alpha, None: off
    smooth_min_ratio: float = 8.0


def int8_settings(target: str, int8: dict) -> dict:
    """The quantizer settings of a target (``tensorrt`` or ``cpu``) from the ``int8`` config section."""
    if target not in TARGETS:
        raise BadInputError(f"--target {target}: expected one of {TARGETS}.")
    t = dict((int8.get("targets") or {}).get(target) or {})
    return {
        "activation_type": str(t.get("activation_type", "int8")),
        "weight_type": str(t.get("weight_type", "int8")),
        "activation_symmetric": bool(t.get("activation_symmetric", target == "tensorrt")),
        "weight_symmetric": bool(t.get("weight_symmetric", True)),
        "per_channel": bool(t.get("per_channel", True)),
        "reduce_range": bool(t.get("reduce_range", False)),
        "weights_as_qdq_pairs": bool(t.get("weights_as_qdq_pairs", False)),
    }


def parse_smooth(value) -> float | None:
    """``--int8-smooth``: ``off``/``none``/``0`` (no smoothing) or an alpha in (0, 1]; ``None`` stays ``None``."""
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in ("off", "none", ""):
        return None
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"--int8-smooth {value}: expected off or an alpha between 0 and 1 (e.g. 0.5).") from None
    if not 0.0 <= alpha <= 1.0 or isinstance(value, bool):
        raise BadInputError(f"--int8-smooth {value}: expected off or an alpha between 0 and 1 (e.g. 0.5).")
    return alpha or None


def int8_options(cfg: Mapping, options: Int8Options) -> Int8Request:
    """Validate an INT8 request (``options``) against the preset ``cfg``; every bad value is a
    :class:`BadInputError`."""
    i8, ccfg = cfg["int8"], cfg["calibration"]
    target, op_policy, keep_float, smooth = options.target, options.op_policy, options.keep_float, options.smooth
    method = str(options.method or ccfg.get("method", "minmax")).lower()
    if method not in METHODS:
        raise BadInputError(f"--calib-method {method}: expected one of {METHODS}.")
    settings = int8_settings(target, i8)
    kf_cfg = dict(i8.get("keep_float") or {})
    kf = parse_keep_float(kf_cfg.get("layers", "none") if keep_float is None else keep_float)
    if op_policy != "linear" and kf[0] != "none":
        if keep_float is not None:
            raise BadInputError("keep-float layers apply to the Linear-only policy; op_policy 'all' quantizes every op.")
        kf = ("none", None)  # the preset's default is for the Linear-only policy
    if str(kf_cfg.get("sensitivity", "only")) not in SENSITIVITY_MODES:
        raise BadInputError(f"int8.keep_float.sensitivity {kf_cfg.get('sensitivity')!r}: expected one of {SENSITIVITY_MODES}.")
    if str(kf_cfg.get("rank_by", "sensitivity")) not in RANK_BY:
        raise BadInputError(f"int8.keep_float.rank_by {kf_cfg.get('rank_by')!r}: expected one of {RANK_BY}.")
    sm_cfg = dict(i8.get("smooth") or {})
    alpha = parse_smooth(sm_cfg.get("alpha", "off") if smooth is None else smooth)
    if op_policy != "linear" and alpha is not None:
        if smooth is not None:
            raise BadInputError("--int8-smooth applies to the Linear-only policy; op_policy 'all' quantizes LayerNorm too.")
        alpha = None
    return Int8Request(target=target, method=method, op_policy=op_policy, settings=settings, keep_float=kf,
                       keep_float_cfg=kf_cfg, op_types=list(i8.get("op_types", LINEAR_OPS)), smooth=alpha,
                       smooth_min_ratio=float(sm_cfg.get("min_ratio", 8.0)))


def calibration_batch(calibration, meta, *, count: int | None, ccfg: Mapping, say) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The calibration images and the held-out images through the model's own preprocessing, and the
    set's description for the metadata.

    ``calibration`` is a set name, a YAML path, a folder, a :class:`~atexport.export.precision.calibration.CalibrationSet`,
    a dict, or an already preprocessed float32 batch (which has no held-out part: ``None``).
    """
    from atexport.export.precision import calibration as calib

    if isinstance(calibration, np.ndarray):
        batch = np.ascontiguousarray(calibration, dtype=np.float32)
        return batch, None, {"name": "array", "source": "array", "images": int(len(batch))}
    cs = calib.load_calibration_set(calibration, count=count, min_images=ccfg.get("min_images"))
    say(f"loading calibration images ({cs.name}: {cs.source}, up to {cs.count}, {cs.holdout} held out) ...")
    return cs.batch(meta.preprocess), cs.batch(meta.preprocess, "holdout"), cs.to_dict()


def calibration_settings(opts: Int8Request, calib_ops, ccfg: Mapping) -> CalibrationSettings:
    """How the activation ranges of ``opts`` are measured (the preset's numbers, the request's method)."""
    return CalibrationSettings.from_preset(opts.method, opts.settings["activation_symmetric"], calib_ops, ccfg)


def activation_ranges(model_path: Path, batch: np.ndarray, meta, settings: CalibrationSettings, *, key,
                      cache_path: Path | None, cs_desc: dict, say) -> tuple[dict, str, float | None]:
    """The calibrated activation ranges: from the cache when it was made under ``key``, else measured
    (and cached). Returns the ranges, the cache status and the calibration seconds (``None`` if reused)."""
    from atexport.export.precision import calibration as calib
    from atexport.export.precision.calibrate import calibrate

    ranges, why = (None, "disabled") if cache_path is None else calib.read_cache(cache_path, key)
    if ranges is not None:
        say(f"reusing calibration cache {cache_path} ({why}) ...")
        return ranges, "reused", None
    say(f"calibrating ({settings.method}, {len(batch)} images; cache: {why}) ...")
    in_batch = meta.input["shape"][0]
    t0 = time.perf_counter()
    ranges = calibrate(str(model_path), batch, settings, input_name=meta.input.get("name", "input"),
                       fixed_batch=int(in_batch) if isinstance(in_batch, int) else None, tasks=task_input(meta),
                       log=say)
    seconds = time.perf_counter() - t0
    if cache_path is None:
        return ranges, "computed", seconds
    calib.write_cache(cache_path, key, ranges, cs_desc, seconds)
    return ranges, f"computed ({why}), saved", seconds


def run_quantizer(model_path: Path, ranges: dict, opts: Int8Request, *, nodes_to_quantize, nodes_to_exclude, tmp: Path):
    """``onnxruntime.quantization.quantize_static`` (QDQ) with the given ranges; returns the loaded model."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from atexport.export.precision.calibrate import expected_ort_messages, expected_quantizer_logs, ort_method

    s = opts.settings
    ort_cache = tmp / "ranges.json"
    ort_cache.write_text(json.dumps({**ranges, "smooth_quant": False}))
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra = {
        "ActivationSymmetric": s["activation_symmetric"],
        "WeightSymmetric": s["weight_symmetric"],
        "AddQDQPairToWeight": s["weights_as_qdq_pairs"],
    }
    if opts.op_policy == "linear":
        # Inputs and weights only: no Q/DQ on the layer's output, none on its bias (TensorRT fuses
        # DQ -> MatMul -> bias Add itself and has no INT32 bias dequantization).
        extra.update({"OpTypesToExcludeOutputQuantization": list(LINEAR_OPS), "QuantizeBias": False,
                      "MatMulConstBOnly": True})
    qpath = tmp / "int8.onnx"
    with expected_ort_messages(), expected_quantizer_logs():
        quantize_static(
            str(model_path), str(qpath), None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=opts.op_types if opts.op_policy == "linear" else None,
            per_channel=s["per_channel"],
            reduce_range=s["reduce_range"],
            activation_type=qtype[s["activation_type"]],
            weight_type=qtype[s["weight_type"]],
            nodes_to_quantize=nodes_to_quantize,
            nodes_to_exclude=nodes_to_exclude,
            calibrate_method=ort_method(opts.method),
            extra_options=extra,
            calibration_cache_path=str(ort_cache),
        )
    return onnx.load(str(qpath))


def unshare_float_consumers(model, quantized: set[str]) -> int:
    """Give every node that is not a quantized Linear layer its float input back.

    ONNX Runtime's QDQ quantizer replaces *all* consumers of a quantized activation with the
    dequantized tensor, so the residual Add that shares its input with an adapter's down-projection
    would silently read INT8-rounded values. Those consumers are rewired to the float tensor, and Q/DQ
    pairs left without consumers are removed. Returns the number of rewired inputs.
    """
    prod = producers(model)
    rewired = 0
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.name in quantized:
            continue
        for k, name in enumerate(n.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a quantized weight (initializer -> DQ): leave it
            n.input[k] = q.input[0]
            rewired += 1
    for o in list(model.graph.output):
        dq = prod.get(o.name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            raise AtexportError(f"graph output {o.name} is dequantized; the quantizer changed an output (a bug).")
    prune_qdq(model)
    return rewired


def check_int8_model(model, opts: Int8Request, meta) -> None:
    """The INT8 model passes ``onnx.checker``, the Linear-only Q/DQ policy and the swappable manifest (else a bug)."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as e:
        raise AtexportError(f"the INT8 model fails onnx.checker ({str(e).splitlines()[0][:300]}); a bug.") from e
    if opts.op_policy == "linear":
        problems = check_int8_graph(model, LINEAR_OPS, symmetric=opts.target == "tensorrt")
        if problems:
            raise AtexportError(f"the INT8 model breaks the Linear-only Q/DQ policy: {'; '.join(problems[:5])} (a bug).")
    if meta.manifest:
        from atexport.artifact.onnx import check_manifest

        check_manifest(model, meta.manifest, "INT8 model")


def quantize_int8(onnx_in, onnx_out=None, calibration=None, *, options: Int8Options | None = None,
                  verify: bool = True, reference=None, images=None, config: str | Mapping = "precision",
                  log=None) -> PrecisionResult:
    """Quantize an FP32 atexport ONNX model to explicit INT8 (Q/DQ), check parity, write it atomically.

    Args:
        onnx_in: the FP32 model (path or ``onnx.ModelProto``) exported by ``atexport onnx``.
        onnx_out: output path; default ``<stem>.int8.onnx`` beside the input.
        calibration: calibration set: a name in ``calibration/``, a YAML path, a folder of images, a
            :class:`~atexport.export.precision.calibration.CalibrationSet`, or an already preprocessed float32 batch
            (default: ``options.calib``, else ``digits``).
        options: the :class:`~atexport.export.precision.options.Int8Options` (default: all defaults), whose
            fields are:
            target: ``tensorrt`` (default: symmetric signed INT8 activations, zero points 0) or ``cpu`` (U8S8,
                for ONNX Runtime's x86 kernels); both quantize the same Linear layers.
            method: calibration method ``minmax``, ``percentile`` or ``entropy`` (default from the preset).
            op_policy: ``linear`` (default: MatMul/Gemm with constant weights only) or ``all`` (every op ONNX
                Runtime can quantize; exists to show why ``linear`` is the default — it is measurably worse).
            keep_float: Linear layers left in float (no Q/DQ): ``"none"``, ``"auto"`` (the most sensitive layers
                while the logit error keeps dropping, within a share of the Linear multiply-adds), an integer N
                (the N most sensitive layers), or layer names/globs (``["head", "*.adapter.*"]``, see
                :func:`~atexport.export.precision.inspect.layer_names`). Sensitivity is each layer's effect on the
                logit error on calibration images, cached with the calibration. Default from the preset
                (``int8.keep_float``).
            smooth: SmoothQuant-style outlier migration folded into LayerNorm and Linear weights before calibration
                (:mod:`~atexport.export.precision.smooth`): ``"off"`` or an alpha in (0, 1]; default from the preset
                (``int8.smooth``). Only LayerNorms whose output channels are uneven are smoothed.
            count: override the calibration set's image count.
            cache: calibration cache file; default ``<output stem>.calib.json``; ``False`` disables it.
        verify, reference, images, config, log: as in :func:`~atexport.export.precision.to_fp16`.

    Raises:
        BadInputError: unreadable input, input without atexport metadata or not FP32, bad options.
        ParityError: outside the int8 tolerance; the model is kept at ``<stem>.failed.onnx``.
    """
    say = log or (lambda *_: None)
    options = options if options is not None else Int8Options()
    calibration = _calibration_source(calibration, options)
    require("onnxruntime", "INT8 quantization (onnxruntime.quantization)", "onnx")

    cfg = load_precision_config(config)
    opts = int8_options(cfg, options)
    t_start = time.perf_counter()
    src, where, meta = read_fp32(onnx_in)
    job = _Int8Job(opts=opts, cfg=cfg, src=src, meta=meta, out=prepare_output(onnx_in, onnx_out, "int8"), say=say)
    _select_layers(job, where)
    _load_calibration(job, calibration, options)
    model, rewired = _quantize(job)
    kf_info = _keep_float(job, model)
    check_int8_model(model, opts, meta)

    report = _graph_report(model, opts, job.plain, job.swap_linear, rewired, kf_info, job.smoothed)
    calibration_info = dict(job.cs_desc)
    calibration_info.update(images=int(len(job.batch)), held_out=0 if job.holdout is None else int(len(job.holdout)),
                            data_sha256=job.key.data_sha256, method=opts.method,
                            cache=str(job.cache_path) if job.cache_path else None, cache_status=job.status)
    meta.precision = "int8"
    meta.extra = dict(meta.extra or {})
    meta.extra["precision"] = _int8_record(opts, calibration_info, job.key.settings, job.key.model_sha256,
                                           job.swap_linear, kf_info, report, cfg)
    carry_over(model, src)
    result = PrecisionResult(path=None, precision="int8", metadata=meta, graph=report, calibration=calibration_info,
                             seconds=job.seconds)
    check = ParityCheck(verify=verify, reference=reference, images=images, parity=cfg["parity"], say=say)
    finish(model, meta, job.out, result, src, check, holdout=job.holdout, holdout_name=job.cs_desc.get("name"))
    result.seconds["total"] = time.perf_counter() - t_start
    return result


@dataclass
class _Int8Job:
    """The state of one :func:`quantize_int8` run, filled in step by step."""

    opts: Int8Request
    cfg: Mapping
    src: Any  # the FP32 input model
    meta: Any
    out: Path
    say: Any
    seconds: dict = field(default_factory=dict)
    swappable: list = field(default_factory=list)
    plain: list = field(default_factory=list)  # the Linear layers to quantize (node names)
    swap_linear: list = field(default_factory=list)  # Linear layers using swappable tensors (kept float)
    batch: Any = None  # the calibration images, preprocessed
    holdout: Any = None
    cs_desc: dict = field(default_factory=dict)
    work: Any = None  # the FP32 model that is calibrated and quantized (smoothed, or the input)
    smoothed: dict | None = None
    calib_settings: CalibrationSettings | None = None
    key: Any = None  # the calibration cache key
    cache_path: Path | None = None
    status: str = ""  # the calibration cache status

    @property
    def linear(self) -> bool:
        return self.opts.op_policy == "linear"

    @property
    def fixed(self) -> int | None:
        in_batch = self.meta.input["shape"][0]
        return int(in_batch) if isinstance(in_batch, int) else None


def _calibration_source(calibration, options: Int8Options):
    """The calibration images: ``calibration`` or ``options.calib`` (not both), else the ``digits`` set."""
    if calibration is not None and options.calib is not None and calibration is not options.calib:
        raise BadInputError("give the calibration images once: as calibration or as Int8Options.calib, not both.")
    if calibration is not None:
        return calibration
    return options.calib if options.calib is not None else "digits"


def _select_layers(job: _Int8Job, where: str) -> None:
    """Which nodes: the Linear layers (constant weights); swappable ones stay float."""
    job.swappable = [e.get("initializer", k) for k, e in (job.meta.manifest or {}).items()]
    job.plain, job.swap_linear = linear_nodes(job.src, job.swappable)
    if job.linear and not job.plain:
        raise BadInputError(f"{where}: no MatMul/Gemm layer with a constant weight to quantize.")


def _load_calibration(job: _Int8Job, calibration, options: Int8Options) -> None:
    """The calibration images, the model they calibrate (smoothed first if asked) and the cache key."""
    from atexport.export.precision import calibration as calib

    opts, ccfg = job.opts, job.cfg["calibration"]
    t0 = time.perf_counter()
    job.batch, job.holdout, job.cs_desc = calibration_batch(calibration, job.meta, count=options.count, ccfg=ccfg,
                                                            say=job.say)
    job.seconds["load_images"] = time.perf_counter() - t0
    job.work = job.src
    if opts.smooth is not None:
        from atexport.export.precision.smooth import smooth_model

        t0 = time.perf_counter()
        job.work, job.smoothed = smooth_model(job.src, job.batch, alpha=opts.smooth, min_ratio=opts.smooth_min_ratio,
                                              swappable=job.swappable, fixed=job.fixed, tasks=task_input(job.meta))
        job.seconds["smooth"] = time.perf_counter() - t0
    dsha = calib.data_hash(job.batch)
    job.calib_settings = calibration_settings(opts, opts.op_types if job.linear else None, ccfg)
    job.key = calib.CacheKey(model_sha256=calib.model_hash(job.work), data_sha256=dsha,
                             settings=job.calib_settings.cache_settings())
    cache = options.cache
    job.cache_path = (None if cache is False else Path(cache) if cache not in (None, True)
                      else calib.default_cache_path(job.out))


def _quantize(job: _Int8Job):
    """Calibrate (or reuse the cache) and quantize; returns the INT8 model and the float consumers rewired."""
    import onnx

    opts = job.opts
    with tempfile.TemporaryDirectory(prefix="atexport-int8-") as tmp:
        model_path = Path(tmp) / "fp32.onnx"
        onnx.save(job.work, str(model_path))
        ranges, job.status, calib_seconds = activation_ranges(model_path, job.batch, job.meta, job.calib_settings,
                                                              key=job.key,
                                                              cache_path=job.cache_path, cs_desc=job.cs_desc,
                                                              say=job.say)
        if calib_seconds is not None:
            job.seconds["calibrate"] = calib_seconds
        t0 = time.perf_counter()
        model = run_quantizer(model_path, ranges, opts, nodes_to_quantize=job.plain if job.linear else None,
                              nodes_to_exclude=job.swap_linear, tmp=Path(tmp))
    rewired = unshare_float_consumers(model, set(job.plain)) if job.linear else 0
    job.seconds["quantize"] = time.perf_counter() - t0
    return model, rewired


def _keep_float(job: _Int8Job, model) -> dict | None:
    """Apply the keep-float request to ``model`` in place; returns what the metadata records (``None``: none)."""
    kind, value = job.opts.keep_float
    if kind == "none":
        return None
    t0 = time.perf_counter()
    request = KeepFloatRequest(kind=kind, value=value, cfg=job.opts.keep_float_cfg, fixed=job.fixed,
                               tasks=task_input(job.meta), cache_path=job.cache_path, cache_key=job.key,
                               quant_settings=job.opts.settings)
    info = apply_keep_float(model, job.work, job.plain, job.batch, request, job.say)
    job.seconds["keep_float"] = time.perf_counter() - t0
    return info


def _graph_report(model, opts: Int8Request, plain, swap_linear, rewired: int, kf_info, smoothed) -> dict:
    """The graph summary of an INT8 model (result and metadata)."""
    s = opts.settings
    report: dict[str, Any] = {
        "recipe": f"onnxruntime QDQ, {opts.op_policy} ops, target {opts.target}, "
                  f"{'S8S8' if s['activation_type'] == 'int8' else 'U8S8'}, "
                  f"{'per-channel' if s['per_channel'] else 'per-tensor'} weights",
        "qdq": qdq_report(model),
        "linear_layers": len(plain),
        "rewired_float_consumers": rewired,
    }
    if kf_info is not None:
        report["kept_float"] = {"layers": kf_info["layers"], "float_share": kf_info["float_share"],
                                "requested": kf_info["requested"]}
    if smoothed is not None:
        report["smoothed"] = smoothed
    if swap_linear:
        report["swappable"] = f"{len(swap_linear)} layers using swappable tensors kept float (tensors FP32)"
    return report


def _int8_record(opts: Int8Request, calibration_info: dict, calib_settings: dict, mhash: str, swap_linear,
                 kf_info, report: dict, cfg: Mapping) -> dict:
    """The ``extra.precision`` metadata of an INT8 model: how it was made."""
    import onnxruntime

    return {
        "precision": "int8",
        "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {onnxruntime.__version__})",
        "target": opts.target,
        "op_policy": opts.op_policy,
        "settings": opts.settings,
        "calibration": {k: v for k, v in calibration_info.items() if k != "cache_status"},
        "calibration_settings": calib_settings,
        "model_sha256": mhash,
        "swappable": "layers using them kept float; tensors FP32" if swap_linear else None,
        "keep_float": kf_info,
        "smooth": {"alpha": opts.smooth, "min_ratio": opts.smooth_min_ratio} if opts.smooth is not None else None,
        "graph": report,
        "config_source": cfg.get("_source"),
    }
