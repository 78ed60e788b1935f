"""``atexport train`` and ``atexport import-official``: help, clean errors with exit codes, a tiny run."""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from _helpers import TINY_ARGS, TINY_BACKBONE, tiny_spec
from atexport.cli import cli

TINY_FLAGS = [
    "--recipe", "digits", "--backbone", TINY_BACKBONE, "--no-pretrained", "--img-size", "32", "--patch-size", "8",
    "--set", "model_args={depth: 4, embed_dim: 64, num_heads: 2}", "--rank", "4", "--epochs", "2",
    "--warmup-epochs", "0", "--batch-size", "32", "--limit-train", "64", "--limit-eval", "32",
    "--workers", "0", "--no-progress",
]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_atexport_help_from_the_installed_entry_point():
    p = subprocess.run([sys.executable, "-m", "atexport", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "train" in p.stdout and "import-official" in p.stdout
    assert p.stderr == ""


def test_train_help_lists_recipes_data_sets_and_flags():
    r = invoke("train", "--help")
    assert r.exit_code == 0
    for word in ("--recipe", "--no-pretrained", "--backbone-weights", "--regime", "--seeds", "--resume",
                 "--limit-train", "--amp", "digits", "pets", "imagefolder:PATH", "defaults"):
        assert word in r.output
    assert invoke("import-official", "--help").exit_code == 0


@pytest.mark.parametrize("args,code,match", [
    (["--regime", "lora"], 2, "Invalid value for '--regime'"),
    (["--no-such-flag"], 2, "No such option"),
    (["--rank", "0"], 2, "Invalid value for '--rank'"),
    (["--epochs", "ten"], 2, "Invalid value for '--epochs'"),
    (["--seed", "1", "--seeds", "0,1"], 2, "--seed or --seeds, not both"),
    (["--dataset", "nope"], 2, "unknown data set"),
    (["--recipe", "nope"], 2, "no training config named 'nope'"),
    (["--recipe", "digits", "--set", "lerning_rate=1"], 2, "unknown training keys lerning_rate"),
    (["--recipe", "digits", "--set", "novalue"], 2, "expected KEY=VALUE"),
    (["--recipe", "digits", "--backbone-weights", "w.pt", "--no-pretrained"], 2, "drop --pretrained"),
    (["--recipe", "digits", "--epochs", "3", "--warmup-epochs", "3"], 2, "--warmup-epochs 3 must be 0 or smaller"),
    (["--recipe", "digits", "--amp", "fp16", "--device", "cpu"], 2, "fp16 needs CUDA"),
    (["--recipe", "digits", "--device", "gpu"], 2, "--device must be"),
])
def test_bad_flags_give_one_clean_message(args, code, match, tmp_path):
    r = invoke("train", *args, "-o", tmp_path / "out")
    assert r.exit_code == code, r.output
    assert match in r.output and "Traceback" not in r.output


def test_missing_data_set_and_nothing_to_resume(tmp_path):
    r = invoke("train", "--recipe", "pets", "--data-dir", tmp_path / "data", "--no-pretrained",
               "--backbone", TINY_BACKBONE, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "oxford-iiit-pet" in r.output and "--download" in r.output
    r = invoke("train", "-o", tmp_path / "empty", "--resume")
    assert r.exit_code == 2 and "nothing to resume" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_missing_dependency(tmp_path):
    r = invoke("train", "--recipe", "digits", "--device", "cuda", "-o", tmp_path / "out")
    assert r.exit_code == 4 and "no CUDA device" in r.output


def test_tiny_training_run_end_to_end_then_resume(tmp_path):
    out = tmp_path / "run"
    r = invoke("train", *TINY_FLAGS, "-o", out)
    assert r.exit_code == 0, r.output
    assert "test top-1" in r.output and "trainable parameters (adapter)" in r.output
    assert {"run.pt", "last.pt", "metrics.jsonl", "config.yaml"} <= {p.name for p in out.iterdir()}
    r = invoke("train", *TINY_FLAGS, "-o", out)
    assert r.exit_code == 2 and "--resume" in r.output
    # Continuing needs only -o: the saved config.yaml is the recipe.
    r = invoke("train", "-o", out, "--resume", "--no-progress")
    assert r.exit_code == 0 and "already complete" in r.output
    r = invoke("train", "-o", out, "--resume", "--lr", "0.5")
    assert r.exit_code == 3 and "lr: 0.01 -> 0.5" in r.output


def test_import_official(tmp_path):
    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import load_checkpoint
    from atexport.models import create_backbone

    model = create_backbone(tiny_spec(3))
    inject_adapters(model, AdapterConfig(rank=4, every=1))
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    (tmp_path / "names.txt").write_text("ant\nbee\ncat\n")
    r = invoke("import-official", "--ckpt", tmp_path / "best.pt", "--backbone", TINY_BACKBONE,
               "--backbone-weights", tmp_path / "best.pt", "--img-size", TINY_ARGS["img_size"],
               "--patch-size", TINY_ARGS["patch_size"], "--class-names", tmp_path / "names.txt",
               "-o", tmp_path / "run.pt")
    assert r.exit_code == 3 and "does not fit" in r.output  # depth/width differ from vit_tiny's defaults
    r = invoke("import-official", "--ckpt", tmp_path / "best.pt", "--backbone", TINY_BACKBONE,
               "--backbone-weights", tmp_path / "best.pt", "--img-size", TINY_ARGS["img_size"],
               "--patch-size", TINY_ARGS["patch_size"], "--model-args", "{depth: 4, embed_dim: 64, num_heads: 2}",
               "--class-names", tmp_path / "names.txt", "-o", tmp_path / "run.pt")
    assert r.exit_code == 0, r.output
    assert "rank 4, every 1" in r.output and "3 classes" in r.output
    ck = load_checkpoint(tmp_path / "run.pt")
    assert ck.model.class_names == ["ant", "bee", "cat"] and ck.model.model_args == TINY_ARGS
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    r = invoke("import-official", "--ckpt", tmp_path / "bad.pt", "--backbone", TINY_BACKBONE, "-o", tmp_path / "x.pt")
    assert r.exit_code == 2 and "cannot read" in r.output


def test_torchrun_two_processes_on_cpu(tmp_path):
    """DistributedDataParallel through torchrun (gloo on CPU here; NCCL on GPUs): rank 0 alone writes."""
    from atexport.checkpoint import load_checkpoint

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "atexport", "train", *TINY_FLAGS, "--epochs", "1", "--device", "cpu", "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                           "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote ") == 1 and "2 processes" in p.stderr
    ck = load_checkpoint(out / "run.pt")
    assert ck.metrics["test_top1"] is not None and ck.config["epochs"] == 1


def test_a_broken_image_is_named_even_from_a_loader_worker(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = tmp_path / "pics" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "pics" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    r = invoke("train", *TINY_FLAGS, "--dataset", f"imagefolder:{tmp_path / 'pics'}", "--val-fraction", "0",
               "--limit-train", "100", "--workers", "1", "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "broken.png: cannot read this image" in r.output and "Traceback" not in r.output
