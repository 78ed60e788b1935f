"""``atexport predict`` (the torch-free runtime on the command line) and ``atexport export-task``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from atexport.errors import BadInputError
from atexport.runtime.backends import BACKENDS, choosable
from atexport.utils.images import IMAGE_SUFFIXES

COMMANDS = ["predict_cmd", "export_task_cmd"]



def expand_images(items) -> list[str]:
    """Image arguments to files: a folder gives the image files under it (recursively, sorted)."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise BadInputError(f"{p}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)}).")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise BadInputError(f"{p}: no such image file or folder.")
    return out


@click.command("predict")
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="An atexport .onnx model, OpenVINO .xml IR, TensorRT .engine, LiteRT .tflite or ExecuTorch .pte "
                   "(the last three with their .json sidecar).")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes to list per image.")
@click.option("--task", default=None,
              help="Task to run: a task name (multi-task models), or a task .npz / checkpoint (separable models).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object with a list of predictions).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime or OpenVINO threads [default: all cores].")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime execution provider, in order of preference (default CPUExecutionProvider). Repeatable.")
@click.option("--backend", type=click.Choice(choosable()), default=None,
              help="Library that runs an ONNX model [default: onnxruntime; openvino for an .xml IR].")
@click.option("--precision", type=click.Choice(BACKENDS["openvino"].precisions), default=None,
              help="OpenVINO only: inference precision [default: the file's own].")
def predict_cmd(model_path, images, top_k, task, as_json, threads, providers, backend, precision):
    """Classify images with an exported model, without PyTorch.

    IMAGES are files or folders of images. The model's own preprocessing (timm's eval transform,
    reproduced with numpy and Pillow) and class names come from its metadata.

    \b
    Examples:
      atexport predict --model model.onnx photo.jpg
      atexport predict --model model.onnx images/ --top-k 3 --json
      atexport predict --model model.onnx --task cars.npz car.jpg     # separable model, another task
      atexport predict --model multitask.onnx --task birds bird.jpg   # multi-task model
      atexport predict --model model.onnx --backend openvino --precision bf16 photo.jpg
    """
    from atexport.runtime.model import load_model

    with load_model(model_path, task=_task_source(task), providers=list(providers) or None, threads=threads,
                    backend=backend, precision=precision) as model:
        preds = model.predict(expand_images(images), top_k=top_k)
        if as_json:
            m = model.metadata
            click.echo(json.dumps({
                "model": str(model_path), "backbone": m.backbone.get("name"), "backend": model.backend,
                "precision": model.precision, "file_precision": m.precision,
                "task": model.task or m.task, "predictions": [p.to_dict() for p in preds],
            }, indent=2))
            return
        if model.backend == "openvino":  # where the precision is a choice, say which one ran (--json: always)
            click.echo(f"{model_path}: {model.runner.describe()}")
        for p in preds:
            task_note = f" [{p.task}]" if model.mode == "multitask" or model.task else ""
            click.echo(f"{p.source}{task_note}: {p.label} ({p.score:.1%})")
            if top_k > 1:
                for label, index, score in p.topk:
                    click.echo(f"    {score:7.2%}  {label} ({index})")


def _task_source(task):
    """A checkpoint given as --task is read here (with torch, where installed): the runtime reads only .npz."""
    if task is None or Path(task).suffix not in (".pt", ".pth") or not Path(task).is_file():
        return task
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise BadInputError(
            f"--task {task}: a checkpoint is a torch file and torch is not installed here; convert it once where "
            f"torch is installed with: atexport export-task --ckpt {task} -o {Path(task).with_suffix('.npz')}"
        )
    from atexport.checkpoint import load_checkpoint

    return load_checkpoint(task, flag="--task")


@click.command("export-task")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="Checkpoint (run.pt) of one task.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The .npz to write [default: <checkpoint stem>.npz beside it].")
@click.option("--name", default=None, help="Task name [default: the run folder's name for "
              "runs/NAME/run.pt, else the checkpoint's file stem].")
def export_task_cmd(ckpt, output, name):
    """Write a checkpoint's adapter and head weights to a torch-free .npz for separable models.

    An app selects the task with load_model("model.onnx", task="cars.npz") or
    'atexport predict --model model.onnx --task cars.npz', with numpy only.

    \b
    Example:
      atexport export-task --ckpt runs/cars/run.pt -o cars.npz
    """
    from atexport.checkpoint import export_task_weights

    path = export_task_weights(ckpt, output, name=name)
    click.echo(f"wrote {path}")
