"""``atexport tasks list|add|remove``: edit the task bank of a multi-task model, without re-exporting.

Thin commands over :func:`atexport.export.multitask.list_tasks`, :func:`~atexport.export.multitask.add_task`
and :func:`~atexport.export.multitask.remove_task`. Models come from ``atexport onnx --multitask``. An
in-place edit replaces the model only if no other edit changed it meanwhile; the later of two concurrent
edits exits with code 2 and asks to run it again.
"""

from __future__ import annotations

import json

import click

COMMANDS = ["tasks_cmd"]


@click.group("tasks")
def tasks_cmd():
    """List, add, replace or remove the tasks of a multi-task model (from 'atexport onnx --multitask').

    \b
    Examples:
      atexport tasks list --model tasks.onnx
      atexport tasks add --model tasks.onnx --ckpt runs/cars/run.pt            # task 'cars', in place
      atexport tasks add --model tasks.onnx --ckpt cars_v2.pt --name cars --replace -o v2.onnx
      atexport tasks remove --model tasks.onnx --name birds
    """


def _table(tasks) -> str:
    lines = [f"{'index':>5}  {'name':<24} {'classes':>7}  {'fingerprint':<12}  source"]
    for t in tasks:
        lines.append(
            f"{t['index']:>5}  {t['name']:<24} {t['num_classes']:>7}  {str(t.get('fingerprint'))[:12]:<12}  {t.get('source') or '-'}"
        )
    return "\n".join(lines)


@tasks_cmd.command("list")
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="A multi-task ONNX model.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata's task list as JSON.")
def list_cmd(model, as_json):
    """Print the tasks of a multi-task model (index, name, classes, weights fingerprint, source file)."""
    from atexport.export.multitask import list_tasks

    tasks = list_tasks(model)
    click.echo(json.dumps(tasks, indent=2) if as_json else _table(tasks))


@tasks_cmd.command("add")
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="A multi-task ONNX model (FP32 or FP16).")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="The task's checkpoint.")
@click.option("--name", default=None, help="Task name [default: the run folder's name for runs/NAME/run.pt, else the "
              "checkpoint's file stem].")
@click.option("--replace", is_flag=True, help="Replace the task of that name (it keeps its index).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="File to write [default: the model itself, replaced atomically unless another edit changed it "
                   "meanwhile (exit 2: run again)].")
def add_cmd(model, ckpt, name, replace, output):
    """Add a task to a multi-task model (or replace one); the other tasks' logits are checked unchanged."""
    from atexport.export.multitask import add_task

    r = add_task(model, ckpt, output, name=name, replace=replace)
    t = next(t for t in r.metadata.tasks if t["name"] == r.task)
    click.echo(
        f"{'replaced' if replace else 'added'} task {r.task!r} (index {t['index']}, {t['num_classes']} classes); "
        f"{len(r.metadata.tasks)} tasks; other tasks unchanged (max abs {r.unchanged_max_abs:.1g}) "
        f"in {r.seconds['total']:.2f}s"
    )
    click.echo(f"wrote {r.path}")


@tasks_cmd.command("remove")
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="A multi-task ONNX model (FP32 or FP16).")
@click.option("--name", required=True, help="The task to remove.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="File to write [default: the model itself, replaced atomically unless another edit changed it "
                   "meanwhile (exit 2: run again)].")
def remove_cmd(model, name, output):
    """Remove a task; the tasks after it move down one index (apps map names through the metadata)."""
    from atexport.export.multitask import remove_task

    r = remove_task(model, name, output)
    click.echo(
        f"removed task {name!r}; {len(r.metadata.tasks)} tasks left: "
        + ", ".join(f"{t['index']}:{t['name']}" for t in r.metadata.tasks)
    )
    click.echo(f"wrote {r.path}")
