"""``atexport verify``: a thin command over :func:`atexport.verify.verify`."""

from __future__ import annotations

import click

COMMANDS = ["verify_cmd"]


@click.command("verify")
@click.option("--ckpt", "ckpts", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Checkpoint the artifacts were made from. Multi-task models: one per task to verify (repeatable).")
@click.option("--onnx", "onnx_paths", multiple=True, type=click.Path(dir_okay=False),
              help="ONNX model (any precision; its metadata says which). Repeatable.")
@click.option("--onnx-fp16", multiple=True, type=click.Path(dir_okay=False), help="FP16 ONNX model. Repeatable.")
@click.option("--onnx-int8", multiple=True, type=click.Path(dir_okay=False), help="INT8 (Q/DQ) ONNX model. Repeatable.")
@click.option("--engine", multiple=True, type=click.Path(dir_okay=False),
              help="TensorRT engine (its .json sidecar beside it). Repeatable.")
@click.option("--openvino", "openvino_paths", multiple=True, type=click.Path(dir_okay=False),
              help="OpenVINO .xml IR, or an ONNX model, to run in OpenVINO at its own precision. Repeatable.")
@click.option("--openvino-precision", type=click.Choice(["fp32", "bf16", "fp16", "int8", "int8+bf16"]), default=None,
              help="Run the --openvino models at this precision (e.g. bf16 for an FP32 file) [default: each file's].")
@click.option("--litert", "litert_paths", multiple=True, type=click.Path(dir_okay=False),
              help="LiteRT .tflite (its .tflite.json sidecar beside it). Repeatable.")
@click.option("--executorch", "executorch_paths", multiple=True, type=click.Path(dir_okay=False),
              help="ExecuTorch .pte (its .pte.json sidecar beside it; needs torch). Repeatable.")
@click.option("--dataset", "datasets", multiple=True, default=["digits"], show_default=True,
              help="Data set: digits (offline), pets, cifar10, ..., or imagefolder:PATH. Multi-task models: one for "
                   "all tasks, or one per --ckpt in the same order.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Verify on a seeded random N images of the split.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Root of downloaded data sets [default: $ATEXPORT_DATA_DIR or ./data].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per inference call.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Folder to write verify.json and verify.md to.")
@click.option("--per-block", is_flag=True, help="Also compare every transformer block and adapter of each ONNX model.")
@click.option("--per-block-images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images for the per-block comparison.")
@click.option("--tolerances", default="tolerances", show_default=True,
              help="Tolerance table: a name in export_configs/ or a YAML file.")
@click.option("--tol", "tol_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one tolerance, e.g. --tol int8.min_cosine=0.99, --tol per_block.fp16=0.02. Repeatable.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads of ONNX Runtime and PyTorch [default: all cores].")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="Local backbone weights for the checkpoint.")
@click.option("--no-progress", is_flag=True, help="One line every few seconds instead of a progress bar.")
def verify_cmd(ckpts, onnx_paths, onnx_fp16, onnx_int8, engine, openvino_paths, openvino_precision, litert_paths,
               executorch_paths, datasets, split, limit, data_dir, batch_size, report_dir,
               per_block, per_block_images, tolerances, tol_overrides, threads, backbone_weights, no_progress):
    """Check every artifact against the PyTorch FP32 model on a labelled data set.

    Reports, per backend and precision: top-1 accuracy, top-1 agreement with PyTorch, max and mean abs
    logit difference, cosine similarity and images/s. Exits nonzero (5) when an artifact is outside the
    tolerances of its precision (export_configs/tolerances.yaml, or --tolerances / --tol).

    A multi-task model is verified task by task, each against its own checkpoint (matched to its task
    by its weights; give any subset of the tasks), then on mixed-task batches, whose rows must equal the
    model's single-task rows.

    \b
    Examples:
      atexport verify --ckpt run.pt --onnx model.onnx --dataset digits --split test
      atexport verify --ckpt run.pt --onnx model.onnx --onnx-int8 model.int8.onnx --report reports/
      atexport verify --ckpt run.pt --onnx-fp16 model.fp16.onnx --per-block --limit 200
      atexport verify --ckpt run.pt --engine model.engine --dataset imagefolder:data/birds
      atexport verify --ckpt run.pt --onnx model.onnx --openvino model.xml --openvino model.int8.xml
      atexport verify --ckpt run.pt --openvino model.onnx --openvino-precision bf16
      atexport verify --ckpt run.pt --litert model.tflite --litert model.int8.tflite --executorch model.pte
      atexport verify --ckpt cars.pt --ckpt birds.pt --onnx tasks.onnx --onnx-fp16 tasks.fp16.onnx
      atexport verify --ckpt cars.pt --ckpt birds.pt --onnx tasks.onnx --dataset D_CARS --dataset D_BIRDS
    """
    from atexport.runtime.artifacts import artifacts
    from atexport.verify.verify import VerifySettings, parse_overrides, verify

    settings = VerifySettings(
        dataset=datasets[0] if len(datasets) == 1 else list(datasets), split=split, limit=limit, data_dir=data_dir,
        batch_size=batch_size, tolerances=tolerances, overrides=parse_overrides(tol_overrides), per_block=per_block,
        per_block_images=per_block_images, openvino_precision=openvino_precision, threads=threads,
        backbone_weights=backbone_weights, report=report_dir, progress=not no_progress,
    )
    result = verify(
        ckpts[0] if len(ckpts) == 1 else list(ckpts), artifacts(litert=litert_paths, executorch=executorch_paths),
        onnx=onnx_paths, onnx_fp16=onnx_fp16, onnx_int8=onnx_int8, engine=engine, openvino=openvino_paths,
        settings=settings, strict=False, log=lambda line: click.echo(line, err=True),
    )
    click.echo(result.headline())
    click.echo(result.table())
    for r in result.per_block:
        click.echo(f"\nper block, {r.artifact} ({r.precision}, {r.samples} images):")
        click.echo(r.table())
        click.echo(r.summary())
    for note in result.notes:
        click.echo(f"note: {note}")
    for kind, path in result.reports.items():
        click.echo(f"wrote {path}")
    result.require_passed()  # ParityError -> "error: verification failed: ..." and exit code 5
    click.echo("verification passed.")
