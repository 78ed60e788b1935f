"""Shared builders for the tests: tiny ViTs, checkpoints with non-trivial adapters, real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_BACKBONE = "vit_tiny_patch16_224"
TINY_ARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)


def tiny_spec(num_classes: int = 5, seed: int = 0, class_names=None):
    from atexport.models import ModelSpec

    return ModelSpec(
        backbone=TINY_BACKBONE,
        num_classes=num_classes,
        model_args=dict(TINY_ARGS),
        source={"kind": "random", "seed": seed},
        class_names=class_names or [f"class_{i}" for i in range(num_classes)],
    )


def make_checkpoint(
    path: Path,
    num_classes: int = 5,
    every: int = 1,
    rank: int = 4,
    seed: int = 0,
    weight_seed: int = 1,
    scale: float = 0.1,
):
    """Write a checkpoint whose adapters and head hold seeded random (non-zero) weights; return its path."""
    import torch

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import Checkpoint, save_checkpoint, trainable_state
    from atexport.models import backbone_fingerprint, create_backbone, preprocess_config

    spec = tiny_spec(num_classes, seed)
    model = create_backbone(spec)
    fp = backbone_fingerprint(model)
    cfg = AdapterConfig(rank=rank, every=every)
    inject_adapters(model, cfg)
    g = torch.Generator().manual_seed(weight_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name or name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    ckpt = Checkpoint(
        model=spec,
        adapter=cfg,
        regime="adapter",
        fingerprint=fp,
        state_dict=trainable_state(model, "adapter"),
        preprocess=preprocess_config(model),
    )
    save_checkpoint(ckpt, path)
    return Path(path)


def real_photos():
    """Real photographs shipped by scikit-image, as PIL images of several sizes and modes."""
    from PIL import Image
    from skimage import data

    imgs = [
        Image.fromarray(data.astronaut()),  # 512x512 RGB
        Image.fromarray(data.chelsea()),  # 300x451 RGB
        Image.fromarray(data.coffee()),  # 400x600 RGB
        Image.fromarray(data.camera()),  # 512x512 L
        Image.fromarray(data.rocket()),  # 427x640 RGB
        Image.fromarray(data.hubble_deep_field()[:300, :400]),
        Image.fromarray(data.immunohistochemistry()),
        Image.fromarray(data.coins()),  # grayscale
    ]
    imgs.append(imgs[0].convert("RGBA"))
    imgs.append(imgs[1].convert("P"))
    return imgs


def random_inputs(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def make_outlier_checkpoint(folder: Path, factor: float = 50.0, num_classes: int = 10, seed: int = 0,
                            weight_seed: int = 1, scale: float = 0.1) -> Path:
    """A tiny-ViT checkpoint whose backbone has the massive LayerNorm-output channels of pretrained ViTs
    (:func:`atexport.models.inject_activation_outliers`), saved as a local backbone file beside it."""
    import torch
    from safetensors.torch import save_file

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import Checkpoint, save_checkpoint, trainable_state
    from atexport.models import backbone_fingerprint, create_backbone, inject_activation_outliers, preprocess_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = tiny_spec(num_classes, seed)
    model = create_backbone(spec)
    inject_activation_outliers(model, factor=factor)
    weights = folder / "outlier_backbone.safetensors"
    save_file(model.state_dict(), str(weights))
    spec.source = {"kind": "file", "path": str(weights)}
    fp = backbone_fingerprint(model)
    cfg = AdapterConfig(rank=4, every=1)
    inject_adapters(model, cfg)
    g = torch.Generator().manual_seed(weight_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name or name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    ckpt = Checkpoint(model=spec, adapter=cfg, regime="adapter", fingerprint=fp,
                      state_dict=trainable_state(model, "adapter"), preprocess=preprocess_config(model))
    return Path(save_checkpoint(ckpt, folder / "outlier.pt"))
