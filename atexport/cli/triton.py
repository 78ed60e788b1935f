"""``atexport triton``: a thin command over :func:`atexport.deploy.triton.write_triton_repo`."""

from __future__ import annotations

import click

from atexport.runtime.backends import triton_backends

COMMANDS = ["triton_cmd"]


@click.command("triton")
@click.option("--model", "model_path", required=True, type=click.Path(),
              help="An atexport .onnx model, OpenVINO .xml IR (with its .bin), or TensorRT .engine (with its .json "
                   "sidecar).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Model repository root.")
@click.option("--name", default=None, help="Model name in the repository [default: the file's stem].")
@click.option("--max-batch", type=int, default=None,
              help="max_batch_size for dynamic-batch models [default: 8 for ONNX, the profile's maximum for engines].")
@click.option("--version", "version", type=click.IntRange(min=1), default=1, show_default=True, help="Version folder.")
@click.option("--preferred-batch", default=None, help="dynamic_batching preferred sizes, comma-separated.")
@click.option("--max-queue-delay-us", type=int, default=None,
              help="dynamic_batching max_queue_delay_microseconds [default: 100].")
@click.option("--instance-kind", type=click.Choice(["cpu", "gpu"]), default=None,
              help="instance_group kind [default: Triton's choice; gpu for engines].")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Instances per group.")
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
@click.option("--backend", type=click.Choice([b.name for b in triton_backends()]), default=None,
              help="Triton backend [default: from the file: .onnx onnxruntime, .engine tensorrt, .xml openvino].")
def triton_cmd(model_path, output, name, max_batch, version, preferred_batch, max_queue_delay_us, instance_kind,
               instances, force, backend):
    """Write a Triton Inference Server model repository for an exported model.

    \b
    Examples:
      atexport triton --model model.onnx -o triton_repo/ --name digits
      atexport triton --model model.engine -o triton_repo/ --max-batch 16
      atexport triton --model model.bf16.xml -o triton_repo/ --name digits_ov   # OpenVINO backend, CPU
      tritonserver --model-repository=$PWD/triton_repo
    """
    from atexport.benchmark import parse_batches
    from atexport.deploy.triton import TritonOptions, write_triton_repo

    # Every value is checked (by TritonOptions, then against the model) before anything is written.

    from atexport.errors import BadInputError

    try:
        preferred = parse_batches(preferred_batch) if preferred_batch else None
    except BadInputError:
        raise BadInputError(f"--preferred-batch {preferred_batch}: expected positive batch sizes separated by commas, "
                            "e.g. 4,8.") from None
    options = TritonOptions(max_batch=max_batch, version=version, preferred_batch=preferred,
                            max_queue_delay_us=max_queue_delay_us, instance_kind=instance_kind, instances=instances)
    repo = write_triton_repo(model_path, output, options, name=name, force=force, backend=backend)
    click.echo(repo.summary())
    for note in repo.notes:
        click.echo(f"note: {note}")
    import shlex

    click.echo(f"wrote {repo.model_dir} (config.pbtxt read back and checked)")
    click.echo("serve it with: tritonserver --model-repository=" + shlex.quote(str(repo.model_dir.parent.resolve())))
