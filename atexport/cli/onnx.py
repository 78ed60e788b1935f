"""``atexport onnx`` and ``atexport swap``: thin commands over :mod:`atexport.export`.

``onnx`` calls :func:`atexport.export.onnx.export_onnx`; ``swap`` calls
:func:`atexport.export.swap.swap_onnx` (``--onnx``) or :func:`atexport.export.tensorrt.refit_engine`
(``--engine``, a refit of a TensorRT engine). Errors are :class:`~atexport.errors.AtexportError`
subclasses, which the CLI group turns into one message and a nonzero exit code.
"""

from __future__ import annotations

import click

from atexport.errors import BadInputError

COMMANDS = ["onnx_cmd", "swap_cmd"]


def _echo_parity(results) -> None:
    from atexport.parity.compare import format_table

    if results:
        click.echo("parity against PyTorch (fp32):")
        click.echo(format_table(results))


@click.command("onnx")
@click.option("--ckpt", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Checkpoint (run.pt) to export; repeat it with --multitask for one model serving several tasks.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="ONNX file to write [default: beside the checkpoint, named like it (runs/cars/run.pt -> "
                   "runs/cars/run.onnx: the run folder names the task); tasks.onnx in the checkpoints' common "
                   "folder with --multitask].")
@click.option("--separable", is_flag=True,
              help="Keep adapter and head weights as named, swappable initializers (see 'atexport swap').")
@click.option("--multitask", is_flag=True,
              help="One model for all --ckpt: the backbone once, a bank of adapters and heads, a per-sample "
                   "task_id input (see 'atexport tasks'). The bank is always swappable.")
@click.option("--max-classes", type=click.IntRange(min=1), default=None,
              help="With --multitask: logits width, the most classes a task may have, also one added later "
                   "[default: the largest task's].")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Fix the batch size [default: dynamic batch axis named 'batch'].")
@click.option("--opset", type=click.IntRange(min=1), default=None, help="ONNX opset, >= 20 [default: from the preset].")
@click.option("--no-simplify", is_flag=True, help="Skip graph simplification.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against PyTorch (not recommended).")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="Local backbone weights, for checkpoints whose backbone is not in timm's hub.")
@click.option("--images", type=click.Path(file_okay=False), default=None,
              help="Folder of extra real images for the parity check (added to scikit-image's samples).")
@click.option("--task-name", multiple=True,
              help="Task name in the metadata [default: the run folder's name for runs/NAME/run.pt, else the "
                   "checkpoint's file stem]; with --multitask one per --ckpt, in order.")
@click.option("--config", "config", default="onnx", show_default=True,
              help="Export preset in export_configs/ (name or YAML path).")
def onnx_cmd(ckpt, output, separable, multitask, max_classes, batch, opset, no_simplify, no_verify, backbone_weights,
             images, task_name, config):
    """Export a checkpoint to ONNX and check it against PyTorch.

    \b
    Examples:
      atexport onnx --ckpt runs/digits/run.pt                      # runs/digits/run.onnx
      atexport onnx --ckpt run.pt -o model.onnx --separable        # swappable adapters
      atexport onnx --ckpt run.pt --batch 8 --no-simplify
      atexport onnx --ckpt a.pt --ckpt b.pt --ckpt c.pt --multitask -o tasks.onnx
    """
    if multitask:
        _multitask(ckpt, output, max_classes, task_name, _settings(
            config, opset, batch, no_simplify, separable, no_verify, backbone_weights, images))
        return
    if len(ckpt) > 1:
        raise BadInputError(
            f"{len(ckpt)} --ckpt given: several checkpoints make one multi-task model only with --multitask "
            "(one backbone, per-sample task_id); to export them separately run 'atexport onnx' once per checkpoint."
        )
    if max_classes is not None:
        raise BadInputError("--max-classes sets the logits width of a multi-task model; it needs --multitask.")
    if len(task_name) > 1:
        raise BadInputError("one --task-name per export (several only with --multitask, one per --ckpt).")
    settings = _settings(config, opset, batch, no_simplify, separable, no_verify, backbone_weights, images)
    from atexport.export.onnx import export_onnx

    result = export_onnx(ckpt[0], output, settings, task_name=task_name[0] if task_name else None)
    click.echo(result.summary())
    if result.parity:
        _echo_parity(result.parity)
    else:
        click.echo("parity:     NOT checked (--no-verify)")
    click.echo(f"wrote {result.path}")


def _settings(config, opset, batch, no_simplify, separable, no_verify, backbone_weights, images):
    """The one :class:`~atexport.export.settings.ExportSettings` of this command (validated: a bad --opset or
    --batch is refused before any checkpoint is read)."""
    from atexport.export.settings import ExportSettings

    return ExportSettings(config=config, opset=opset, batch=batch, simplify=False if no_simplify else None,
                          separable=separable, verify=not no_verify, backbone_weights=backbone_weights,
                          images=images, log=lambda line: click.echo(line, err=True))


def _multitask(ckpts, output, max_classes, task_names, settings):
    from atexport.export.multitask import export_multitask
    from atexport.parity.compare import format_table

    result = export_multitask(list(ckpts), output, settings, task_names=list(task_names) or None,
                              max_classes=max_classes)
    click.echo(result.summary())
    if result.parity:
        click.echo("parity, each task's rows of mixed-task batches against its own PyTorch model (fp32):")
        click.echo(format_table(result.parity))
    else:
        click.echo("parity:     NOT checked (--no-verify)")
    click.echo(f"wrote {result.path}")


@click.command("swap")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None,
              help="A model exported with 'atexport onnx --separable' (or a separable .tflite / .pte from "
                   "'atexport litert/executorch --separable').")
@click.option("--engine", "engine_path", type=click.Path(dir_okay=False), default=None,
              help="Instead of --onnx: a TensorRT engine built with 'atexport trt --refit', refitted without rebuilding.")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="The other task's checkpoint.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="File to write [default: beside the model, named by the task (runs/cars/run.pt -> cars.onnx, "
                   "cars.engine, cars.tflite, cars.pte); a multi-task engine is refitted in place].")
@click.option("--task-name", default=None,
              help="Task name in the metadata [default: the run folder's name for runs/NAME/run.pt, else the "
                   "checkpoint's file stem]; for a multi-task engine, the task "
                   "to replace.")
@click.option("--verify", is_flag=True,
              help="Also rebuild the PyTorch model of --ckpt and check parity (needs its backbone weights).")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="Local backbone weights for --verify.")
def swap_cmd(onnx_path, engine_path, ckpt, output, task_name, verify, backbone_weights):
    """Write a model with another task's adapters and head, without re-exporting (or rebuilding an engine).

    Refuses, with the reason, a checkpoint whose backbone fingerprint, adapter rank, placement or class
    count does not fit the model.

    \b
    Examples:
      atexport swap --onnx birds.onnx --ckpt runs/cars/run.pt -o cars.onnx
      atexport swap --engine birds.engine --ckpt runs/cars/run.pt -o cars.engine
      atexport swap --engine tasks.engine --ckpt cars_v2.pt --task-name cars     # one task of a multi-task engine
    """
    if onnx_path is not None and engine_path is not None:
        raise BadInputError("give either --onnx (swap into an ONNX model) or --engine (refit a TensorRT engine), not both.")
    if onnx_path is None and engine_path is None:
        raise BadInputError("give the model to swap into: --onnx MODEL.onnx, or --engine MODEL.engine (TensorRT).")
    from pathlib import Path

    from atexport.export.task_swap import swap
    from atexport.runtime.model import ENGINE_SUFFIXES

    is_engine = Path(engine_path or onnx_path).suffix.lower() in ENGINE_SUFFIXES
    if engine_path is not None and not is_engine:
        raise BadInputError(f"--engine {engine_path}: not a TensorRT engine ({', '.join(ENGINE_SUFFIXES)}); give an "
                            "ONNX, .tflite or .pte model with --onnx.")
    if onnx_path is not None and is_engine:
        raise BadInputError(f"--onnx {onnx_path}: that is a TensorRT engine; refit it with --engine {onnx_path}.")
    if is_engine and verify:
        raise BadInputError(
            "--verify checks an ONNX swap against PyTorch; check a refitted engine with "
            "'atexport verify --ckpt CKPT --engine ENGINE --dataset ...'."
        )
    # One library call for every kind of model (atexport.export.task_swap.swap); only the printing differs.
    result = swap(engine_path or onnx_path, ckpt, output, task_name=task_name, verify=verify,
                  backbone_weights=backbone_weights, log=lambda line: click.echo(line, err=True))
    if is_engine:
        _echo_refit(result)
        return
    m = result.metadata
    click.echo(
        f"swapped {result.swapped} tensors: task {m.extra['swap']['from_task']!r} -> {m.task!r} "
        f"({m.num_classes} classes) in {result.seconds['swap'] * 1000:.0f} ms"
    )
    if result.parity:
        _echo_parity(result.parity)
    click.echo(f"wrote {result.path}")


def _echo_refit(result):
    from atexport.cli.trt import echo_refit
    from atexport.parity.compare import format_table

    # Every refit is parity-checked against the swapped ONNX model, like a build.
    tasks = result.sidecar["metadata"].get("tasks")
    if tasks:  # a multi-task engine: echo_refit describes single-task engines
        t = next(t for t in tasks if t["name"] == result.sidecar["metadata"]["extra"]["refit"]["task"])
        click.echo(f"refitted {result.refitted} bank tensors: task {t['name']!r} (index {t['index']}, "
                   f"{t['num_classes']} classes) replaced in {result.seconds.get('refit', 0) * 1000:.0f} ms")
        if result.parity:
            click.echo("parity of the refitted engine against the swapped ONNX model (ONNX Runtime):")
            click.echo(format_table(result.parity))
        extra = f", {result.onnx_path.name}" if result.onnx_path else ""
        click.echo(f"wrote {result.path} (+ {result.path.name}.json, {result.sidecar['bank']['path']}{extra})")
    else:
        echo_refit(result)
