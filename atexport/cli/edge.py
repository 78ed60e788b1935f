"""``atexport litert`` and ``atexport executorch``: verified on-device models for phones and small boards.

Each calls one library function (:func:`atexport.export.litert.export_litert`,
:func:`atexport.export.executorch.export_executorch`) and prints the parity table against PyTorch.
"""

from __future__ import annotations

import click

COMMANDS = ["litert_cmd", "executorch_cmd"]


def _common(f):
    f = click.option("--config", default="onnx", show_default=True,
                     help="Preset holding the parity settings (export_configs/, name or YAML path).")(f)
    f = click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch (not recommended).")(f)
    f = click.option("--images", type=click.Path(file_okay=False), default=None,
                     help="Folder of extra real images for the parity check (added to scikit-image's samples).")(f)
    f = click.option("--task-name", default=None, help="The task's name in the metadata [default: the checkpoint's].")(f)
    f = click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
                     help="Local backbone weights, for a backbone not in timm's hub.")(f)
    f = click.option("--separable", is_flag=True,
                     help="Adapter and head tensors as model inputs: swap tasks without re-exporting.")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
                     help="fp32, or int8 (LiteRT: dynamic-range weights; ExecuTorch: XNNPACK quantizer, dynamic per-channel).")(f)
    return f


def _report(result):
    if result.parity:
        from atexport.parity.compare import format_table

        click.echo(f"parity against PyTorch ({result.precision} tolerances):")
        click.echo(format_table(result.parity))
    click.echo(result.summary())
    beside = [result.path.name + ".json"] + ([result.path.name + ".task.npz"] if result.metadata.separable else [])
    click.echo(f"wrote {result.path} (+ {', '.join(beside)})")


@click.command("litert")
@click.option("--ckpt", "ckpt_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint (run.pt).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Model to write (.tflite) [default: <checkpoint stem>.tflite beside it].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="LiteRT threads for the check.")
@_common
def litert_cmd(ckpt_path, output, threads, precision, separable, backbone_weights, task_name, images, no_verify, config):
    """Convert a checkpoint to LiteRT (.tflite, Android / Raspberry Pi) and check it against PyTorch.

    \b
    Examples:
      atexport litert --ckpt runs/digits/run.pt -o model.tflite
      atexport litert --ckpt runs/digits/run.pt -o model.int8.tflite --precision int8
      atexport litert --ckpt runs/digits/run.pt -o sep.tflite --separable   # swap tasks with a task .npz
      atexport predict --model model.tflite photo.jpg
    """
    from atexport.export.litert import export_litert

    result = export_litert(ckpt_path, output, separable=separable, precision=precision, verify=not no_verify,
                           images=images, threads=threads, task_name=task_name, backbone_weights=backbone_weights,
                           config=config, log=lambda msg: click.echo(msg, err=True))
    _report(result)


@click.command("executorch")
@click.option("--ckpt", "ckpt_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint (run.pt).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Program to write (.pte) [default: <checkpoint stem>.pte beside it].")
@_common
def executorch_cmd(ckpt_path, output, precision, separable, backbone_weights, task_name, images, no_verify, config):
    """Convert a checkpoint to ExecuTorch (.pte with the XNNPACK delegate, Android / iOS) and check it against PyTorch.

    \b
    Examples:
      atexport executorch --ckpt runs/digits/run.pt -o model.pte
      atexport executorch --ckpt runs/digits/run.pt -o sep.pte --separable
      atexport predict --model model.pte photo.jpg      # ExecuTorch's Python runtime needs torch
    """
    from atexport.export.executorch import export_executorch

    result = export_executorch(ckpt_path, output, separable=separable, precision=precision, verify=not no_verify,
                               images=images, task_name=task_name, backbone_weights=backbone_weights, config=config,
                               log=lambda msg: click.echo(msg, err=True))
    _report(result)
