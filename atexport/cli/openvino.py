"""``atexport openvino``: write a verified OpenVINO IR from an atexport ONNX model.

Calls :func:`atexport.export.openvino.to_openvino` and prints what ran and the parity table.
"""

from __future__ import annotations

import click

COMMANDS = ["openvino_cmd"]


@click.command("openvino")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False),
              help="ONNX model written by atexport: FP32 (model.onnx), separable, multi-task, or INT8 Q/DQ (model.int8.onnx).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="IR to write (.xml, its .bin beside it) [default: model.xml; model.bf16.xml / model.fp16.xml].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8", "int8+bf16"]), default=None,
              help="What the IR runs at by default: fp32 (exact), bf16 (AMX / AVX512-BF16 CPUs), fp16; for Q/DQ files "
                   "int8 (float ops FP32) or int8+bf16 (float ops BF16, fastest) [default: fp32, or int8 for a Q/DQ file].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="OpenVINO threads for the check [all cores].")
@click.option("--images", type=click.Path(file_okay=False), default=None,
              help="Folder of extra real images for the parity check (added to scikit-image's samples).")
@click.option("--no-cache", is_flag=True, help="Do not write the compiled-model cache folder (<stem>.ov_cache).")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against ONNX Runtime (not recommended).")
@click.option("--config", default="precision", show_default=True,
              help="Preset holding the parity settings (export_configs/, name or YAML path).")
def openvino_cmd(onnx_path, output, precision, threads, images, no_cache, no_verify, config):
    """Convert an ONNX model to OpenVINO IR and check it against ONNX Runtime.

    \b
    Examples:
      atexport openvino --onnx model.onnx                      # model.xml, FP32, exact
      atexport openvino --onnx model.onnx --precision bf16     # model.bf16.xml (AMX CPUs)
      atexport openvino --onnx model.int8.onnx                 # model.int8.xml, INT8 from the Q/DQ layers
      atexport openvino --onnx model.int8.onnx --precision int8+bf16   # model.int8.bf16.xml
      atexport predict --model model.xml photo.jpg
    """
    from atexport.export.openvino import to_openvino

    result = to_openvino(onnx_path, output, precision=precision, verify=not no_verify, images=images, threads=threads,
                         cache_dir=False if no_cache else None, config=config,
                         log=lambda msg: click.echo(msg, err=True))
    if result.parity:
        from atexport.parity.compare import format_table

        click.echo(f"parity against ONNX Runtime ({result.precision} tolerances):")
        click.echo(format_table(result.parity))
    click.echo(result.summary())
    click.echo(f"wrote {result.path} (+ {result.path.with_suffix('.bin').name})")
