"""Writing an OpenVINO IR (``.xml`` + ``.bin``) from an atexport ONNX model, verified before it is written.

``atexport openvino --onnx model.onnx [--precision fp32|bf16|fp16]`` (or ``model.int8.onnx``, which runs
its Q/DQ layers in INT8) converts the ONNX model with OpenVINO's reader, runs it through
:class:`~atexport.runtime.openvino.OpenVINORunner` at the chosen precision against ONNX Runtime on the
same ONNX file, and writes the IR only if it passes:

* ``fp32``: the ``fp32`` tolerances (float rounding);
* ``bf16`` / ``fp16``: the ``bf16`` / ``fp16`` rows of ``export_configs/tolerances.yaml`` (top-1 agreement
  on real photos included);
* ``int8`` / ``int8+bf16`` (a Q/DQ file; float ops in FP32 / BF16): the ``int8`` row, against ONNX Runtime
  running the *same* Q/DQ file (that file was verified against FP32 when ``atexport`` wrote it; this checks
  that OpenVINO runs it the same way).

The metadata travels in the IR itself: the atexport document (with ``extra.openvino``: the precision the
IR runs at by default, the OpenVINO version, the runtime INT8 layer count, the parity rows) is stored in
the model's ``rt_info`` under ``atexport``, which ``ov.save_model`` writes into the ``.xml`` and
:func:`atexport.runtime.openvino.read_metadata` reads back; no sidecar file. Weights stay FP32 in the
``.bin`` (``compress_to_fp16=False``) for every precision: the precision is a runtime hint, and FP32
weights keep one IR valid for all of them and keep a separable model's swappable tensors exact.

Writes are atomic (both files go to a temporary folder ``.NAME.<pid>.<random>.tmp`` beside the output, which
the next run removes if this one was killed; the ``.bin`` is moved first,
the ``.xml`` last); a model that fails parity is kept at ``<stem>.failed.xml`` and nothing is written at
the output. A compiled-model cache folder (``<stem>.ov_cache/``, OpenVINO's ``CACHE_DIR``) is filled by
loading the written IR once, so an app that passes the same folder skips compiling; it is only a cache (OpenVINO checks
its validity itself) and can be deleted.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from atexport.errors import BadInputError, ParityError

IR_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8+bf16")


@dataclass
class OpenVINOResult:
    """What :func:`to_openvino` produced.

    Attributes:
        path: the written ``.xml`` (``None`` when parity failed); its ``.bin`` lies beside it.
        precision: what the IR runs at by default (``fp32``, ``bf16``, ``fp16``, ``int8``).
        metadata: the metadata written into it.
        parity: parity rows against ONNX Runtime on the source ONNX file.
        runner: how the verification ran (precision, INT8 layers, threads).
        cache_dir: the compiled-model cache folder, or ``None``.
        seconds: wall time per step.
        failed_path: where a model that failed parity was kept.
    """

    path: Path | None
    precision: str
    metadata: object
    parity: list = field(default_factory=list)
    runner: str = ""
    cache_dir: Path | None = None
    seconds: dict = field(default_factory=dict)
    failed_path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.parity)

    def summary(self) -> str:
        lines = [f"precision:  {self.precision} ({self.runner})"]
        if self.cache_dir:
            lines.append(f"cache:      {self.cache_dir}")
        lines.append("time:       " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def default_output(onnx_in: str | os.PathLike, precision: str) -> Path:
    """``model.onnx`` -> ``model.xml`` (fp32), ``model.bf16.xml`` / ``model.fp16.xml``; ``model.int8.onnx`` ->
    ``model.int8.xml`` (int8), ``model.int8.bf16.xml`` (int8+bf16)."""
    p = Path(onnx_in)
    tag = {"fp32": "", "int8": "", "int8+bf16": ".bf16"}.get(precision, f".{precision}")
    return p.with_name(f"{p.stem}{tag}.xml")


def default_cache_dir(output: str | os.PathLike) -> Path:
    p = Path(output)
    return p.with_name(f"{p.stem}.ov_cache")


def _check_output(onnx_in: Path, output, precision: str) -> Path:
    from atexport.utils.io import check_writable

    out = check_writable(output if output is not None else default_output(onnx_in, precision), "-o")
    if out.suffix.lower() != ".xml":
        raise BadInputError(f"-o {out}: an OpenVINO IR is an .xml file (with its .bin beside it); give a path ending in .xml.")
    return out


def _save_ir(ov_model, folder: Path, stem: str) -> tuple[Path, Path]:
    import openvino as ov

    xml = folder / f"{stem}.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return xml, xml.with_suffix(".bin")


def _move_ir(xml: Path, target: Path) -> Path:
    """Move an IR pair over ``target`` (.xml) and its .bin: the .bin first, so a reader never sees a new
    .xml with an old .bin."""
    os.replace(xml.with_suffix(".bin"), target.with_suffix(".bin"))
    os.replace(xml, target)
    return target


def _verify(src: Path, xml: Path, meta, precision: str, images, par: Mapping, threads, say):
    """Parity of the IR in OpenVINO against ONNX Runtime on the source ONNX file."""
    from atexport.artifact.bank import task_input
    from atexport.export.precision.calibration import holdout_for
    from atexport.export.precision.verified import judged_images
    from atexport.parity import ParitySettings, check_parity
    from atexport.parity.images import photo_batch
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.openvino import OpenVINORunner

    photos = photo_batch(meta.preprocess, max_images=par.get("max_images"))
    judged, judged_name = judged_images(meta, images, *holdout_for(meta, say))
    batch = meta.input["shape"][0]
    sizes = [int(batch)] if isinstance(batch, int) else [int(b) for b in par.get("batch_sizes", [1, 4])]
    in_shape = [int(v) for v in meta.preprocess["input_size"]]
    random_inputs = par.get("random_inputs", 0)
    if isinstance(random_inputs, Mapping):
        random_inputs = random_inputs.get(precision, random_inputs.get("int8" if precision.startswith("int8") else "fp16", 8))
    tolerance_key = "int8" if precision.startswith("int8") else precision
    what = f"{len(judged)} in-domain images ({judged_name}) and " if judged is not None else ""
    say(f"checking OpenVINO {precision} parity against ONNX Runtime on {what}{len(photos)} photos ...")
    ref = OnnxRuntimeRunner(str(src), name="onnxruntime", optimization=par.get("optimization", "all"))
    cand = OpenVINORunner(str(xml), precision=precision, threads=threads, name=f"openvino-{precision}",
                          where=f"--onnx {src} (as an OpenVINO {precision} IR)")
    with ref, cand:
        pairs = [("", ref, cand)]
        if task_input(meta):  # multi-task model: every task on its own (its task_id fed, its logits only)
            from atexport.runtime.tasks import task_runners

            pairs = [(f" {t['name']}", r, c) for (t, r), (_, c) in zip(task_runners(meta, ref), task_runners(meta, cand))]
        rows = []
        for suffix, r, c in pairs:
            rows += check_parity(r, c, photos, tolerance_key, judged=judged, judged_name=judged_name,
                                 label=f"openvino {precision}{suffix}", settings=ParitySettings(
                                     random_inputs=int(random_inputs or 0), input_shape=in_shape,
                                     seed=int(par.get("seed", 0)), batch_sizes=sizes,
                                     tolerances=par.get("tolerances", "tolerances")))
        return rows, cand.describe(), cand.int8_layers, cand.inference_precision


def to_openvino(
    onnx_in: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    precision: str | None = None,
    verify: bool = True,
    images=None,
    threads: int | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    config: str | Mapping = "precision",
    log=None,
) -> OpenVINOResult:
    """Convert an atexport ONNX model to a verified OpenVINO IR, written atomically.

    Args:
        onnx_in: an ONNX model written by atexport (FP32, separable, multi-task, or an INT8 Q/DQ model).
        output: the ``.xml`` to write (its ``.bin`` goes beside it); default :func:`default_output`.
        precision: what the IR runs at by default: ``fp32``, ``bf16``, ``fp16`` (FP32/FP16 ONNX files),
            ``int8`` or ``int8+bf16`` (Q/DQ files; ``int8`` is their default). ``None``: the file's own.
        verify: check parity against ONNX Runtime before writing (on by default; off only to save time).
        images: extra real images for parity (a folder or a list of paths or PIL images).
        threads: OpenVINO threads for the verification run.
        cache_dir: compiled-model cache folder; default ``<stem>.ov_cache`` beside the output; ``False``: none.
        config: the precision preset holding the parity settings (``parity`` section).
        log: optional callable receiving progress lines.

    Raises:
        BadInputError: missing or unreadable ONNX file, no atexport metadata, unknown or inapplicable
            precision (e.g. ``bf16`` for an INT8 model), output not an ``.xml``.
        MissingDependencyError: openvino is not installed, or the CPU cannot run the precision.
        ParityError: outside the tolerance; the IR is kept at ``<stem>.failed.xml``, nothing at ``output``.
    """
    from atexport.export.precision import load_precision_config

    say = log or (lambda *_: None)
    t_start = time.perf_counter()
    ov, src, ov_model, meta, precision = _read_source(onnx_in, precision)
    out = _check_output(src, output, precision)
    if out.resolve() == src.resolve():
        raise BadInputError(f"-o {out}: that is the input model; choose another output path.")
    cache = None if cache_dir is False else Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir(out)
    par = dict(load_precision_config(config)["parity"])
    seconds = {"read": time.perf_counter() - t_start}

    meta.extra = dict(meta.extra or {})
    record = {"precision": precision, "source": src.name, "source_precision": meta.precision,
              "openvino": ov.get_version(), "weights": "fp32 (compress_to_fp16=False)",
              "cache_dir": cache.name if cache else None}
    result = OpenVINOResult(path=None, precision=precision, metadata=meta, cache_dir=cache, seconds=seconds)
    _write_ir(ov_model, src, out, result, record, (verify, images, par, threads, say))
    if cache:  # compile the written IR once: loads it back (metadata included) and fills the cache
        from atexport.runtime.openvino import OpenVINORunner

        t0 = time.perf_counter()
        with OpenVINORunner(str(out), threads=threads, cache_dir=cache) as r:
            if r.precision != precision:
                raise BadInputError(f"{out}: reads back as {r.precision}, written as {precision} (a bug).")
        seconds["cache"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    return result


def _read_source(onnx_in, precision: str | None):
    """``(openvino, source path, OpenVINO model, metadata, precision)`` of an atexport ONNX model, the
    precision resolved against the model (its own when ``None``)."""
    from atexport.runtime.openvino import (
        check_ov_graph,
        is_quantized,
        read_metadata,
        read_ov_model,
        require_openvino,
        resolve_precision,
    )

    if precision is not None and str(precision).lower() not in IR_PRECISIONS:
        raise BadInputError(f"--precision {precision}: expected one of {', '.join(IR_PRECISIONS)}.")
    ov = require_openvino()
    src = Path(onnx_in)
    if not src.is_file():
        raise BadInputError(f"--onnx {src}: no such file.")
    if src.suffix.lower() != ".onnx":
        raise BadInputError(f"--onnx {src}: expected an .onnx model written by atexport (got {src.suffix or 'no suffix'}).")
    where = f"--onnx {src}"
    ov_model = read_ov_model(src, "--onnx")
    meta = read_metadata(ov_model, where)
    if meta is None:
        raise BadInputError(f"{where}: no atexport metadata (preprocessing, classes); export it with 'atexport onnx'.")
    check_ov_graph(meta, ov_model, where)
    return ov, src, ov_model, meta, resolve_precision(precision, is_quantized(ov_model), where)


def _write_ir(ov_model, src: Path, out: Path, result: OpenVINOResult, record: dict, check) -> None:
    """Save the IR in a temporary folder beside ``out``, check its parity, and move it to ``out`` (or to
    ``.failed.xml``, raising :class:`ParityError`).

    Args:
        check: ``(verify, images, parity settings, threads, say)``.
    """
    from atexport.artifact.onnx import failed_path_for
    from atexport.runtime.openvino import read_ov_model
    from atexport.utils.io import clean_stale_temps

    verify, images, par, threads, say = check
    meta, precision, seconds = result.metadata, result.precision, result.seconds
    # named as atomic writes name their temporaries (.NAME.<pid>.<random>.tmp): a run killed here leaves a
    # folder that the next write of this output removes (clean_stale_temps), as it removes stale files
    clean_stale_temps(out)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent) as tmp:
        meta.extra["openvino"] = record
        ov_model.set_rt_info(meta.to_json(), "atexport")
        t0 = time.perf_counter()
        xml, _ = _save_ir(ov_model, Path(tmp), out.stem)
        seconds["convert"] = time.perf_counter() - t0
        if verify:
            t0 = time.perf_counter()
            rows, desc, int8_layers, inf_prec = _verify(src, xml, meta, precision, images, par, threads, say)
            seconds["verify"] = time.perf_counter() - t0
            result.parity, result.runner = rows, desc
            record.update(parity=[r.to_dict() for r in rows], reference="onnxruntime on " + src.name,
                          inference_precision=inf_prec, int8_layers=list(int8_layers))
            meta.extra["openvino"] = record
            ov_model = read_ov_model(xml)  # the IR exactly as written, metadata updated with the parity rows
            ov_model.set_rt_info(meta.to_json(), "atexport")
            xml, _ = _save_ir(ov_model, Path(tmp), out.stem + ".final")
        if verify and not result.passed:
            from atexport.parity.compare import format_table

            failed = Path(failed_path_for(out))
            result.failed_path = _move_ir(xml, failed)
            err = ParityError(
                f"the OpenVINO {precision} model does not match ONNX Runtime on {src.name} within the {precision} "
                f"tolerances:\n{format_table(result.parity)}\nNothing was written to {out}; the failing IR is kept "
                f"at {failed} (+ .bin)."
            )
            err.result = result
            raise err
        result.path = _move_ir(xml, out)
