"""Input builders of the issue-22 rows of ``tests/test_bad_inputs.py``: run folders, sweep cells, edited
checkpoints and official-layout checkpoints, each written into a row's scratch folder ``d``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from _helpers import make_checkpoint

FINISHED = '{"epoch": 1, "train_loss": 1.0, "train_top1": 50.0}\n{"event": "test", "epoch": 1, "test_top1": 60.0}\n'


def fake_run(name: str = "run", *, metrics: str = FINISHED, config: str = "dataset: digits\nbackbone: "
             "vit_tiny_patch16_224\nrank: 4\nseed: 0\n", verify: str | None = None, run_pt=None) -> Callable:
    """``d/<name>/`` holding a run's text files (and ``run_pt``'s bytes as run.pt)."""
    def build(d: Path) -> None:
        r = d / name
        r.mkdir(parents=True, exist_ok=True)
        (r / "config.yaml").write_text(config)
        (r / "metrics.jsonl").write_text(metrics)
        if verify is not None:
            (r / "verify.json").write_text(verify)
        if run_pt is not None:
            (r / "run.pt").write_bytes(run_pt)
    return build


def sweep_cell(fn: Callable) -> Callable:
    """Edit cell r1/seed_0 of the copied tiny sweep (``d/sw``): ``fn(cell folder, sweep folder)``."""
    def build(d: Path) -> None:
        fn(d / "sw" / "adaptertune_r1_e1" / "seed_0", d / "sw")
    return build


def edit_run_pt(path: Path, fn: Callable) -> None:
    import torch

    doc = torch.load(path, weights_only=True)
    fn(doc)
    torch.save(doc, path)


def ckpt_with(fn: Callable, name: str = "k.pt") -> Callable:
    """A tiny checkpoint ``d/<name>`` edited by ``fn(dict)``."""
    def build(d: Path) -> None:
        make_checkpoint(d / name, num_classes=5, weight_seed=5)
        edit_run_pt(d / name, fn)
    return build


def _first_adapter_nan(doc) -> None:
    key = next(k for k in sorted(doc["state_dict"]) if ".adapter." in k and k.endswith("weight"))
    doc["state_dict"][key].view(-1)[0] = float("nan")


OFFICIAL_ARGS = "{{img_size: 32, patch_size: 8, depth: 4, embed_dim: 64, num_heads: 2}}"


def official_ckpt(nan: bool = False) -> Callable:
    """``d/off.pt``: an official-layout AdapterTune checkpoint of the tiny ViT (optionally a NaN adapter)."""
    def build(d: Path) -> None:
        import torch

        from _helpers import TINY_ARGS, TINY_BACKBONE
        from atexport.adapter import AdapterConfig, inject_adapters
        from atexport.models import ModelSpec, create_backbone

        model = create_backbone(ModelSpec(TINY_BACKBONE, 3, dict(TINY_ARGS)))
        inject_adapters(model, AdapterConfig(rank=2, every=1))
        sd = model.state_dict()
        if nan:
            _first_adapter_nan({"state_dict": sd})
        torch.save({"model": sd, "epoch": 9}, d / "off.pt")
    return build


def import_official(*extra: str, model_args: str = OFFICIAL_ARGS) -> list:
    return ["import-official", "--ckpt", "{d}/off.pt", "--backbone", "vit_tiny_patch16_224", "--backbone-weights",
            "{d}/off.pt", "--model-args", model_args, "-o", "{d}/x.pt", *extra]


NO_FLAGS = ("weights_only=False", "allow_pickle", "--ckpt", "--resume")  # files found in folders name no flag
