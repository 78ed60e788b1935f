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
    f = click.option("--max-classes", type=click.IntRange(min=1), default=None,
                     help="Several --ckpt: width of the logits [default: the largest task's class count].")(f)
    f = click.option("--task-name", "task_names", multiple=True,
                     help="The task's name in the metadata [default: the checkpoint's]; one per --ckpt.")(f)
    f = click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
                     help="Local backbone weights, for a backbone not in timm's hub.")(f)
    f = click.option("--separable", is_flag=True,
                     help="Adapter and head tensors as model inputs: swap tasks without re-exporting.")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "int8", "int8-static", "int8-full"]), default="fp32",
                     show_default=True,
                     help="fp32, int8 (LiteRT: dynamic-range weights; ExecuTorch: XNNPACK quantizer, dynamic "
                          "per-channel), int8-static (ExecuTorch only: static per-channel, calibrated with --calib) "
                          "or int8-full (LiteRT only: full-integer, calibrated with --calib).")(f)
    return f


def _export(fmt, ckpts, output, precision, separable, backbone_weights, task_names, max_classes, images, no_verify,
            config, **kw):
    """One checkpoint: the single-task exporter of ``fmt``; several: one multi-task model (task_id input)."""
    from atexport.errors import BadInputError
    from atexport.export.edge import EdgeOptions

    options = EdgeOptions(images=images, backbone_weights=backbone_weights, config=config,
                          threads=kw.pop("threads", None))
    common = dict(precision=precision, verify=not no_verify, options=options, log=lambda msg: click.echo(msg, err=True))
    if len(ckpts) > 1:
        if separable:
            raise BadInputError("--separable is for one --ckpt; several make a multi-task model (task_id input).")
        if output is None:
            raise BadInputError("give the multi-task model's path with -o.")
        from atexport.export.edge_multitask import export_multitask_edge

        return export_multitask_edge(list(ckpts), output, fmt, task_names=task_names or None, max_classes=max_classes,
                                     **common)
    if max_classes is not None:
        raise BadInputError("--max-classes is for multi-task models (several --ckpt).")
    if len(task_names) > 1:
        raise BadInputError(f"{len(task_names)} --task-name for one --ckpt.")
    if fmt == "litert":
        from atexport.export.litert import export_litert as export
    else:
        from atexport.export.executorch import export_executorch as export
    return export(ckpts[0], output, separable=separable, task_name=task_names[0] if task_names else None, **common, **kw)


def _report(result):
    if result.parity:
        from atexport.parity.compare import format_table

        click.echo(f"parity against PyTorch ({result.metadata.precision} tolerances):")
        click.echo(format_table(result.parity))
    click.echo(result.summary())
    beside = [result.path.name + ".json"] + ([result.path.name + ".task.npz"] if result.metadata.separable else [])
    click.echo(f"wrote {result.path} (+ {', '.join(beside)})")


@click.command("litert")
@click.option("--ckpt", "ckpts", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Checkpoint (run.pt); several make one multi-task model with a task_id input.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Model to write (.tflite) [default: <checkpoint stem>.tflite beside it].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="LiteRT threads for the check.")
@click.option("--calib", default=None,
              help="--precision int8-full: calibration set (a name in calibration/, a YAML file or a folder); its "
                   "held-out images are the judged parity row.")
@click.option("--calib-count", type=click.IntRange(min=1), default=None, help="Calibration images [the set's].")
@_common
def litert_cmd(ckpts, output, threads, calib, calib_count, precision, separable, backbone_weights, task_names,
               max_classes, images, no_verify, config):
    """Convert a checkpoint to LiteRT (.tflite, Android / Raspberry Pi) and check it against PyTorch.

    \b
    Examples:
      atexport litert --ckpt runs/digits/run.pt -o model.tflite
      atexport litert --ckpt runs/digits/run.pt -o model.int8.tflite --precision int8
      atexport litert --ckpt runs/digits/run.pt -o model.full.tflite --precision int8-full --calib digits
      atexport litert --ckpt runs/digits/run.pt -o sep.tflite --separable   # swap tasks with a task .npz
      atexport litert --ckpt cars.pt --ckpt birds.pt -o tasks.tflite          # multi-task (task_id input)
      atexport predict --model model.tflite photo.jpg
    """
    if len(ckpts) > 1 and (precision == "int8-full" or calib or calib_count):
        from atexport.errors import BadInputError

        raise BadInputError("--precision int8-full and --calib are for one --ckpt (multi-task models: fp32 or int8).")
    kw = {} if len(ckpts) > 1 else {"threads": threads, "calib": calib, "calib_count": calib_count}
    _report(_export("litert", ckpts, output, precision, separable, backbone_weights, task_names, max_classes, images,
                    no_verify, config, **kw))


@click.command("executorch")
@click.option("--ckpt", "ckpts", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Checkpoint (run.pt); several make one multi-task model with a task_id input.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Program to write (.pte) [default: <checkpoint stem>.pte beside it].")
@click.option("--calib", default=None,
              help="--precision int8-static: calibration set (a name in calibration/, a YAML file or a folder) [digits].")
@click.option("--calib-count", type=click.IntRange(min=1), default=None, help="Calibration images [the set's].")
@_common
def executorch_cmd(ckpts, output, calib, calib_count, precision, separable, backbone_weights, task_names, max_classes, images, no_verify,
                   config):
    """Convert a checkpoint to ExecuTorch (.pte with the XNNPACK delegate, Android / iOS) and check it against PyTorch.

    \b
    Examples:
      atexport executorch --ckpt runs/digits/run.pt -o model.pte
      atexport executorch --ckpt runs/digits/run.pt -o sep.pte --separable
      atexport executorch --ckpt cars.pt --ckpt birds.pt -o tasks.pte        # multi-task (task_id input)
      atexport predict --model model.pte photo.jpg      # ExecuTorch's Python runtime needs torch
    """
    if len(ckpts) > 1 and (precision == "int8-static" or calib or calib_count):
        from atexport.errors import BadInputError

        raise BadInputError("--precision int8-static and --calib are for one --ckpt (multi-task models: fp32 or int8).")
    kw = {"calib": calib, "calib_count": calib_count} if len(ckpts) == 1 else {}
    _report(_export("executorch", ckpts, output, precision, separable, backbone_weights, task_names, max_classes,
                    images, no_verify, config, **kw))
