"""``atexport trt``: precision ONNX (FP16 / INT8 Q/DQ, verified with ONNX Runtime) and TensorRT engines.

A thin command over :func:`atexport.export.tensorrt.export_tensorrt` (its options grouped into
:class:`~atexport.export.tensorrt.Int8Options` and :class:`~atexport.export.tensorrt.EngineOptions`, which
validate every value before any work). The refit of an engine with another task's weights is
:func:`atexport.export.tensorrt.refit_engine`, which ``atexport swap --engine`` calls; :func:`echo_refit`
prints its result the way this command prints a build.
"""

from __future__ import annotations

import click

COMMANDS = ["trt_cmd"]


def echo_refit(result) -> None:
    """Print a :class:`~atexport.export.tensorrt.RefitResult` (for ``atexport swap --engine``)."""
    from atexport.parity.compare import format_table

    m = result.sidecar["metadata"]
    click.echo(f"refitted {result.refitted} tensors -> task {m.get('task')!r} ({m.get('num_classes')} classes) "
               f"in {result.seconds.get('refit', 0) * 1000:.0f} ms")
    if result.parity:
        click.echo("parity of the refitted engine against the swapped ONNX model (ONNX Runtime):")
        click.echo(format_table(result.parity))
    extra = f", {result.onnx_path.name}" if result.onnx_path else ""
    click.echo(f"wrote {result.path} (+ {result.path.name}.json{extra})")


@click.command("trt")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None,
              help="Model from 'atexport onnx' (FP32, or already of --precision).")
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint: exported to ONNX first when --onnx is missing; else the PyTorch parity reference.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True)
@click.option("--calib", default=None,
              help="INT8 calibration images: a set in calibration/ (digits, photos, ...), a YAML file or a folder.")
@click.option("--calib-count", type=click.IntRange(min=1), default=None, help="Calibration images to draw.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
              help="Calibration method [default: from export_configs/precision.yaml].")
@click.option("--calib-cache", type=click.Path(dir_okay=False), default=None,
              help="Calibration cache file [default: <int8 model stem>.calib.json].")
@click.option("--no-calib-cache", is_flag=True, help="Neither read nor write a calibration cache.")
@click.option("--int8-keep-float", "int8_keep_float", default=None, metavar="auto|none|N|LAYERS",
              help="INT8: Linear layers left in float: auto (the most sensitive ones, measured on the calibration "
                   "images, within a latency budget), none, N (the N most sensitive), or comma-separated layer names "
                   "or globs (head,*.adapter.*) [default: from export_configs/precision.yaml].")
@click.option("--int8-smooth", "int8_smooth", default=None, metavar="off|ALPHA",
              help="INT8: SmoothQuant-style migration of activation outliers into the weights, folded into LayerNorm "
                   "and Linear (exact in FP32), where a LayerNorm's channels are uneven: off, or the alpha (0-1) "
                   "[default: from export_configs/precision.yaml].")
@click.option("--target", type=click.Choice(["tensorrt", "cpu"]), default="tensorrt", show_default=True,
              help="INT8 flavour: symmetric S8S8 for TensorRT, or U8S8 for ONNX Runtime on CPU (no engine).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Engine file [default: <precision model stem>.engine].")
@click.option("--onnx-out", type=click.Path(dir_okay=False), default=None,
              help="Precision ONNX file [default: <stem>.fp16.onnx / <stem>.int8.onnx beside the model].")
@click.option("--batch", default=None, help="Optimisation profile MIN,OPT,MAX batch sizes [default: 1,8,32].")
@click.option("--workspace", type=float, default=None, help="Workspace memory limit in GiB [default: TensorRT's].")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache to reuse and update [default: one per TensorRT version and GPU beside the engine].")
@click.option("--refit", is_flag=True, help="Make the adapter and head weights refittable (separable models).")
@click.option("--version-compatible", is_flag=True, help="Build an engine later TensorRT versions can run.")
@click.option("--hardware-compatible", is_flag=True, help="Build an engine any Ampere-or-newer GPU can run.")
@click.option("--opt-level", type=int, default=None, help="Builder optimisation level 0-5.")
@click.option("--images", type=click.Path(file_okay=False), default=None, help="Extra real images for parity.")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="Local backbone weights for --ckpt.")
@click.option("--no-verify", is_flag=True, help="Skip the parity checks (not recommended).")
@click.option("--build", type=click.Choice(["yes", "auto", "no"]), default="yes", show_default=True,
              help="Build the engine: yes (TensorRT and a GPU required), auto (where they exist, else stop after "
                   "the precision ONNX), no (precision ONNX only).")
def trt_cmd(onnx_path, ckpt, precision, calib, calib_count, calib_method, calib_cache, no_calib_cache, int8_keep_float,
            int8_smooth, target, output,
            onnx_out, batch, workspace, timing_cache, refit, version_compatible, hardware_compatible, opt_level,
            images, backbone_weights, no_verify, build):
    """Make an FP16 or INT8 ONNX model, verify it, and build a TensorRT engine from exactly that model.

    The precision ONNX model is written (and checked against the FP32 reference with ONNX Runtime)
    before TensorRT is needed, so on a machine without TensorRT or a GPU the command still produces
    it, then stops with the command to run on the GPU machine (exit 4; with --build auto it stops there
    successfully, and --build no never builds).

    \b
    Examples:
      atexport trt --onnx model.onnx --precision fp16
      atexport trt --onnx model.onnx --precision int8 --calib digits
      atexport trt --onnx model.onnx --precision int8 --calib digits --int8-keep-float 'head,*.adapter.*'
      atexport trt --ckpt run.pt --precision int8 --calib data/pets/train --refit
      atexport trt --onnx model.fp16.onnx --precision fp16 --batch 1,4,16 --workspace 4
    """
    from atexport.export.tensorrt import EngineOptions, Int8Options, describe_plan, export_tensorrt
    from atexport.parity.compare import format_table

    # Both option groups validate every value here, whatever --build says (a bad --batch fails before any work).
    int8 = Int8Options(calib=calib, count=calib_count, method=calib_method,
                       cache=False if no_calib_cache else calib_cache, keep_float=int8_keep_float, smooth=int8_smooth,
                       target=target)
    engine = EngineOptions(batch=batch, workspace_gb=workspace, refit=refit, version_compatible=version_compatible,
                           hardware_compatible=hardware_compatible, timing_cache=timing_cache,
                           optimization_level=opt_level, build=build, output=output)
    result = export_tensorrt(
        onnx_path, ckpt, precision=precision, precision_output=onnx_out, int8=int8, engine=engine,
        verify=not no_verify, images=images, backbone_weights=backbone_weights,
        log=lambda line: click.echo(line, err=True),
    )
    # The precision model's summary and parity went to stderr as it was made (before TensorRT was needed).
    click.echo(f"precision model: {result.precision_onnx}")
    if result.note:
        click.echo(result.note)
    if result.engine is not None:
        click.echo(describe_plan(result.plan))
        if result.parity:
            click.echo("parity of the engine:")
            click.echo(format_table(result.parity))
        click.echo(f"wrote {result.engine.path} (+ {result.engine.sidecar_path.name})")
