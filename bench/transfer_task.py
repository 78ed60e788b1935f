"""The digits transfer task: a small ViT pretrained fully on digits 0-4, adapted to digits 5-9.

A random backbone is a poor stand-in for a pretrained one when the question is how much an adapter
must change it. This builds, offline and in about a minute on 2 CPU cores, a backbone that has really
learned something (every weight trained on scikit-learn's digits of classes 0-4) and a downstream task
it has never seen (classes 5-9), both as image folders that ``--dataset imagefolder:PATH`` reads.

    from transfer_task import build_transfer_backbone
    task = build_transfer_backbone("runs/transfer", seed=0)
    # task["weights"]: backbone safetensors for --backbone-weights
    # task["task_dataset"]: "imagefolder:runs/transfer/digits_5_9"; task["train_args"]: the model flags

Run as a script to build it and print the flags.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BACKBONE = "vit_tiny_patch16_224"
MODEL_ARGS = {"depth": 4, "embed_dim": 128, "num_heads": 4, "global_pool": "avg"}
IMG, PATCH, SIZE = 32, 8, 32
PRETRAIN = dict(regime="full", epochs=12, warmup_epochs=1, batch_size=64, lr=1e-3, weight_decay=0.05,
                scale=[0.85, 1.0], ratio=[0.9, 1.1], hflip=0.0, workers=0, val_fraction=0.1, progress=False)


def write_digit_folders(out: Path, classes, size: int = SIZE) -> Path:
    """Digits of ``classes`` as ``out/{train,test}/<digit>/<i>.png`` (the fixed 20% test split of atexport)."""
    from atexport.data import load_dataset

    if (out / "done.json").is_file():
        return out
    for split in ("train", "test"):
        ds = load_dataset("digits", split, size=size)
        for i in range(len(ds)):
            img, label = ds[i]
            if int(label) in classes:
                p = out / split / str(int(label)) / f"{i:04d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                img.save(p)
    (out / "done.json").write_text(json.dumps({"classes": list(classes), "size": size}))
    return out


def build_transfer_backbone(out_dir, seed: int = 0, log=print) -> dict:
    """Pretrain the backbone on digits 0-4 (all weights) and write the 5-9 task; reuse what exists.

    Args:
        out_dir: folder for the image folders, the pretraining run and the weights.
        seed: seed of the random initialisation and of the pretraining.
        log: receives progress lines.

    Returns:
        ``weights`` (safetensors), ``task_dataset`` (``imagefolder:...`` of digits 5-9),
        ``pretrain_top1`` (test top-1 of the pretraining on 0-4), and ``train_args`` (the TrainConfig
        keys of the backbone for the task runs).
    """
    from safetensors.torch import save_file

    from atexport.checkpoint import load_checkpoint
    from atexport.training import TrainConfig, train

    out = Path(out_dir)
    src = write_digit_folders(out / "digits_0_4", range(0, 5))
    task = write_digit_folders(out / "digits_5_9", range(5, 10))
    weights = out / f"backbone_seed{seed}.safetensors"
    run = out / f"pretrain_seed{seed}"
    model = dict(backbone=BACKBONE, model_args=dict(MODEL_ARGS), img_size=IMG, patch_size=PATCH)
    if not weights.is_file():
        log(f"pretraining {BACKBONE} {MODEL_ARGS} on digits 0-4 (all weights, {PRETRAIN['epochs']} epochs)")
        cfg = TrainConfig.from_dict({**PRETRAIN, **model, "dataset": f"imagefolder:{src}", "pretrained": False,
                                     "backbone_seed": seed, "seed": seed, "output": str(run), "overwrite": True})
        res = train(cfg, log=log)
        sd = load_checkpoint(res.checkpoint).state_dict
        sd = {k: v.contiguous() for k, v in sd.items() if not k.startswith("head.")}
        save_file(sd, str(weights))
    pretrain_top1 = load_checkpoint(run / "run.pt").metrics.get("test_top1") if (run / "run.pt").is_file() else None
    return {"weights": str(weights), "task_dataset": f"imagefolder:{task}", "pretrain_top1": pretrain_top1,
            "train_args": {**model, "backbone_weights": str(weights)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="runs/transfer")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = build_transfer_backbone(a.output, a.seed)
    print(json.dumps(t, indent=2))


if __name__ == "__main__":
    main()
