"""``atexport bench``: a thin command over :func:`atexport.benchmark.benchmark`."""

from __future__ import annotations

import click

COMMANDS = ["bench_cmd"]


@click.command("bench")
@click.option("--ckpt", "ckpts", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Checkpoint: its PyTorch model is the baseline, and the artifacts' origin. Multi-task models: "
                   "the checkpoint of each task timed (repeatable).")
@click.option("--onnx", "onnx_paths", multiple=True, type=click.Path(dir_okay=False), help="ONNX model. Repeatable.")
@click.option("--onnx-fp16", multiple=True, type=click.Path(dir_okay=False), help="FP16 ONNX model. Repeatable.")
@click.option("--onnx-int8", multiple=True, type=click.Path(dir_okay=False), help="INT8 ONNX model. Repeatable.")
@click.option("--engine", multiple=True, type=click.Path(dir_okay=False), help="TensorRT engine. Repeatable.")
@click.option("--openvino/--no-openvino", "openvino", default=None,
              help="Also time every ONNX model in OpenVINO (fp32 and bf16, or int8 and int8+bf16 for a Q/DQ model; "
                   "bf16 where the CPU has AMX or AVX512-BF16) [default: when openvino is installed].")
@click.option("--litert", "litert_paths", multiple=True, type=click.Path(dir_okay=False),
              help="LiteRT .tflite (sidecar beside it), timed at batch 1. Repeatable.")
@click.option("--executorch", "executorch_paths", multiple=True, type=click.Path(dir_okay=False),
              help="ExecuTorch .pte (sidecar beside it), timed at batch 1. Repeatable.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs per row.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs before them.")
@click.option("--torch-compile", is_flag=True, help="Also time torch.compile(model).")
@click.option("--torch-device", default=None,
              help="Device of the PyTorch baseline [default: cpu, plus cuda when timing an engine on a GPU].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads of ONNX Runtime and PyTorch [default: all cores].")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime execution provider. Repeatable.")
@click.option("--task", default=None, metavar="NAME",
              help="Multi-task models: time this task (its --ckpt given) [default: the task of a single --ckpt].")
@click.option("--mixed", is_flag=True,
              help="Multi-task models: time batches mixing the --ckpt tasks (ids interleaved 0 1 2 0 1 2 ...) against "
                   "each task's PyTorch model on its share, one after another.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="Local backbone weights for the checkpoint.")
def bench_cmd(ckpts, onnx_paths, onnx_fp16, onnx_int8, engine, openvino, litert_paths, executorch_paths, batches, runs, warmup, torch_compile, torch_device,
              threads, providers, task, mixed, json_path, backbone_weights):
    """Latency (p50/p90/p99) and throughput per backend, precision and batch size, with PyTorch as baseline.

    \b
    Examples:
      atexport bench --ckpt run.pt --onnx model.onnx --onnx-int8 model.int8.onnx --batch 1,8
      atexport bench --ckpt run.pt --engine model.engine --batch 1,8,32 --json bench.json
      atexport bench --ckpt run.pt --onnx model.onnx --torch-compile --runs 100
      atexport bench --ckpt run.pt --onnx model.onnx --litert model.tflite --executorch model.pte --batch 1
      atexport bench --ckpt run.pt --onnx model.onnx --onnx-int8 model.int8.onnx --no-openvino
      atexport bench --ckpt cars.pt --onnx tasks.onnx --batch 1,8            # one task of a multi-task model
      atexport bench --ckpt cars.pt --ckpt birds.pt --onnx tasks.onnx --mixed --batch 8,32
    """
    from atexport.benchmark import BenchSettings, benchmark
    from atexport.utils.machine import machine_line

    settings = BenchSettings(batches=batches, runs=runs, warmup=warmup, torch_compile=torch_compile,
                             torch_device=torch_device, threads=threads, providers=list(providers) or None,
                             openvino=openvino, backbone_weights=backbone_weights, task=task, mixed=mixed)
    result = benchmark(
        ckpts[0] if len(ckpts) == 1 else list(ckpts), onnx=onnx_paths, onnx_fp16=onnx_fp16, onnx_int8=onnx_int8,
        engine=engine, litert=litert_paths, executorch=executorch_paths, settings=settings, output_json=json_path,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(f"machine: {machine_line(result.machine)}")
    click.echo(f"{runs} timed runs after {warmup} warm-up runs per row; input {result.config['input']} (preprocessed)")
    mt = result.config.get("multitask")
    if mt:
        click.echo(f"multi-task: {mt['mode']} ({', '.join(mt['tasks'])}); baseline: {mt['baseline']}")
    click.echo(result.table())
    for note in result.notes:
        click.echo(f"note: {note}")
    if json_path:
        click.echo(f"wrote {json_path}")
