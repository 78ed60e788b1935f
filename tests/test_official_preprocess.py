"""The official AdapterTune transform: recorded on import and by ``preprocess: official``, reproduced everywhere.

The official code evaluates with ``Resize(256) + CenterCrop(224) + Normalize(ImageNet)`` (torchvision,
bilinear). An imported checkpoint must record exactly that, so the exported model's torch-free runtime
preprocessing, and atexport's own eval transform (verify, training), compute the same numbers on real
photographs.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _helpers import TINY_BACKBONE, real_photos
from atexport.adapter import AdapterConfig, inject_adapters
from atexport.checkpoint import load_checkpoint
from atexport.errors import BadInputError
from atexport.models import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, create_backbone, preprocess_config
from atexport.runtime.preprocess import Preprocessor
from atexport.training import TrainConfig, convert_official

ARGS_224 = dict(img_size=224, patch_size=16, depth=1, embed_dim=64, num_heads=2)
# Pillow does the resize and crop in both; the rest is float32 arithmetic (measured: 0.0 on these photos)
TOL = 1e-6


def official_eval_transform():
    """The official code's eval transform (src/datasets/torchvision_datasets.py), with torchvision."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def reference(photos) -> np.ndarray:
    tf = official_eval_transform()
    return np.stack([tf(p.convert("RGB")).numpy() for p in photos])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """An official-layout checkpoint of a 224 px one-block ViT, imported with the default flags."""
    d = tmp_path_factory.mktemp("official")
    model = create_backbone(ModelSpec(TINY_BACKBONE, 3, dict(ARGS_224)))
    inject_adapters(model, AdapterConfig(rank=2, every=1))
    torch.save({"model": model.state_dict(), "epoch": 49}, d / "best.pt")
    ck = convert_official(d / "best.pt", TINY_BACKBONE, d / "run.pt", backbone_weights=d / "best.pt",
                          model_args=dict(ARGS_224))
    return d, ck


def test_import_records_the_official_transform(imported):
    d, ck = imported
    pp = load_checkpoint(d / "run.pt").preprocess
    assert pp == {"input_size": [3, 224, 224], "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD), "crop_pct": 0.875, "crop_mode": "center"}
    assert "resize 256 + center crop 224x224, bilinear, mean (0.485, 0.456, 0.406)" in ck.preprocess_note
    # the backbone's timm config is what it was before: 0.5 mean/std, crop 0.9, bicubic
    timm_pp = preprocess_config(create_backbone(ModelSpec(TINY_BACKBONE, 3, dict(ARGS_224))))
    assert (timm_pp["mean"], timm_pp["crop_pct"], timm_pp["interpolation"]) == ([0.5] * 3, 0.9, "bicubic")


def test_runtime_of_an_imported_model_equals_the_official_eval_transform(imported):
    """Exported ONNX model -> load_model -> its Preprocessor, against torchvision on real photos."""
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.runtime import load_model

    d, _ = imported
    export_onnx(d / "run.pt", d / "model.onnx", ExportSettings(verify=False))
    runtime = load_model(d / "model.onnx")
    photos = real_photos()
    ours = runtime.preprocessor(photos)
    ref = reference(photos)
    assert ours.shape == ref.shape == (len(photos), 3, 224, 224)
    assert float(np.abs(ours - ref).max()) < TOL
    # the bug this guards against: the timm config of the same backbone is far from it
    timm_pp = preprocess_config(create_backbone(ModelSpec(TINY_BACKBONE, 3, dict(ARGS_224))))
    assert float(np.abs(Preprocessor(timm_pp)(photos) - ref).max()) > 0.1


def test_atexport_eval_transform_equals_the_official_one(imported):
    """What verify and training feed PyTorch (timm's create_transform of the recorded dict)."""
    from atexport.data import eval_transform

    d, _ = imported
    tf = eval_transform(load_checkpoint(d / "run.pt").preprocess)
    photos = real_photos()
    ours = np.stack([tf(p.convert("RGB")).numpy() for p in photos])
    assert float(np.abs(ours - reference(photos)).max()) < TOL


def test_timm_and_fork_overrides(imported, tmp_path):
    d, _ = imported
    ck = convert_official(d / "best.pt", TINY_BACKBONE, tmp_path / "timm.pt", backbone_weights=d / "best.pt",
                          model_args=dict(ARGS_224), preprocess="timm")
    assert ck.preprocess["mean"] == [0.5] * 3 and "--preprocess timm" in ck.preprocess_note
    ck = convert_official(d / "best.pt", TINY_BACKBONE, tmp_path / "fork.pt", backbone_weights=d / "best.pt",
                          model_args=dict(ARGS_224), preprocess={"crop_pct": 1.0})
    assert (ck.preprocess["crop_pct"], ck.preprocess["mean"]) == (1.0, list(IMAGENET_MEAN))


@pytest.mark.parametrize("value,match", [
    ("imagenet", "expected 'official', 'timm', or a YAML mapping"),
    ({"crop": 1.0}, "unknown keys"),
    ({"crop_pct": 0}, "not a valid transform"),
    ({"interpolation": "cubic"}, "not a valid transform"),
])
def test_bad_preprocess_overrides_are_refused(imported, tmp_path, value, match):
    d, _ = imported
    with pytest.raises(BadInputError, match=match):
        convert_official(d / "best.pt", TINY_BACKBONE, tmp_path / "x.pt", backbone_weights=d / "best.pt",
                         model_args=dict(ARGS_224), preprocess=value)
    assert not (tmp_path / "x.pt").exists()


def test_import_official_cli_says_which_transform(imported, tmp_path):
    from atexport.cli import cli

    d, _ = imported
    r = CliRunner().invoke(cli, ["import-official", "--ckpt", str(d / "best.pt"), "--backbone", TINY_BACKBONE,
                                 "--backbone-weights", str(d / "best.pt"), "--img-size", "224", "--patch-size",
                                 "16", "--model-args", "{depth: 1, embed_dim: 64, num_heads: 2}",
                                 "-o", str(tmp_path / "run.pt")])
    assert r.exit_code == 0, r.output
    assert "preprocessing: the official AdapterTune transform: resize 256 + center crop 224x224" in r.output


def test_training_config_preprocess_official():
    cfg = TrainConfig(dataset="digits", preprocess="official")
    assert cfg.preprocess == "official"
    with pytest.raises(BadInputError, match="--preprocess must be one of timm, official"):
        TrainConfig(dataset="digits", preprocess="imagenet")
    model = create_backbone(ModelSpec(TINY_BACKBONE, 3, dict(ARGS_224)))
    pp = preprocess_config(model, "official")
    assert (pp["interpolation"], pp["crop_pct"], pp["mean"]) == ("bilinear", 0.875, list(IMAGENET_MEAN))


def test_a_run_trained_with_preprocess_official_records_it(tmp_path):
    from atexport.models import official_preprocess
    from atexport.training import train

    cfg = TrainConfig.from_dict(dict(
        dataset="digits", backbone=TINY_BACKBONE, pretrained=False, img_size=32, patch_size=8,
        model_args={"depth": 1, "embed_dim": 32, "num_heads": 2}, rank=2, epochs=1, warmup_epochs=0,
        batch_size=32, workers=0, limit_train=32, limit_eval=16, progress=False, preprocess="official",
        output=str(tmp_path / "run")))
    res = train(cfg, log=lambda s: None)
    ck = load_checkpoint(res.checkpoint)
    assert ck.preprocess == official_preprocess([3, 32, 32]) and ck.config["preprocess"] == "official"
