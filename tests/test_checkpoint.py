"""run.pt: round trip, weights-only loading, refusing another backbone, corrupt files, official imports."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from _helpers import TINY_ARGS, TINY_BACKBONE, tiny_spec
from atexport.adapter import AdapterConfig, inject_adapters
from atexport.checkpoint import build_model, load_checkpoint, save_checkpoint
from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.models import ModelSpec, backbone_tensors, create_backbone
from atexport.training import TrainConfig, convert_official, train

TINY_RUN = dict(
    dataset="digits", backbone=TINY_BACKBONE, pretrained=False,
    model_args={k: v for k, v in TINY_ARGS.items() if k not in ("img_size", "patch_size")},
    img_size=32, patch_size=8, rank=4, epochs=1, warmup_epochs=0, batch_size=32, workers=0,
    limit_train=64, limit_eval=32, progress=False,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(TrainConfig.from_dict({**TINY_RUN, "output": str(out)}), log=lambda s: None)


def _x(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_round_trip_rebuilds_the_trained_model(run):
    ck = load_checkpoint(run.checkpoint)
    assert ck.regime == "adapter" and (ck.adapter.rank, ck.adapter.every) == (4, 1)
    assert ck.model.backbone == TINY_BACKBONE and ck.model.source == {"kind": "random", "seed": 0}
    assert ck.model.model_args == TINY_ARGS and ck.model.num_classes == 10
    assert ck.metrics["epoch"] == 1 and "test_top1" in ck.metrics and ck.config["rank"] == 4
    model = build_model(ck)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), run.model.cpu()(_x()), atol=0, rtol=0)
    again = run.output / "again.pt"
    save_checkpoint(ck, again)
    ck2 = load_checkpoint(again)
    assert ck2.to_dict().keys() == ck.to_dict().keys() and ck2.fingerprint == ck.fingerprint
    assert all(torch.equal(ck.state_dict[k], ck2.state_dict[k]) for k in ck.state_dict)


def test_files_load_weights_only_with_resume_state(run):
    for path in (run.checkpoint, run.last):
        d = torch.load(path, map_location="cpu", weights_only=True)
        assert d["format"] == "atexport.checkpoint"
    r = torch.load(run.last, map_location="cpu", weights_only=True)["resume"]
    assert {"epoch", "step", "optimizer", "scheduler", "rng", "best", "history"} <= set(r)
    assert r["optimizer"]["state"] and isinstance(r["rng"]["torch"], torch.Tensor)
    assert run.checkpoint.stat().st_size < run.last.stat().st_size
    umask = __import__("os").umask(0)
    __import__("os").umask(umask)
    assert run.checkpoint.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_another_backbone_is_refused(run, tmp_path):
    ck = load_checkpoint(run.checkpoint)
    other = create_backbone(tiny_spec(num_classes=10, seed=1))
    save_file({k: v.contiguous() for k, v in backbone_tensors(other).items()}, tmp_path / "other.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match="fingerprint"):
        build_model(ck, backbone_weights=tmp_path / "other.safetensors")
    ck.model.source = {"kind": "random", "seed": 7}
    with pytest.raises(IncompatibleCheckpointError, match="backbone's tensors differ"):
        build_model(ck)
    # The right weights, given as a file, are accepted.
    mine = create_backbone(tiny_spec(num_classes=10, seed=0))
    torch.save(backbone_tensors(mine), tmp_path / "mine.pt")
    assert build_model(ck, backbone_weights=tmp_path / "mine.pt") is not None


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_corrupt_and_foreign_files_give_clear_errors(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {}
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    cases["noise.pt"] = "not a readable atexport checkpoint"
    data = run.checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated.pt"] = "not a readable atexport checkpoint"
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    cases["plain.pt"] = "not an atexport checkpoint"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "epoch": 3}, tmp_path / "official.pt")
    cases["official.pt"] = "import-official"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Evil(), f, protocol=2)
    cases["evil.pt"] = "not a readable atexport checkpoint"
    torch.save({"format": "atexport.checkpoint", "format_version": 1}, tmp_path / "damaged.pt")
    cases["damaged.pt"] = "damaged atexport checkpoint"
    for name, match in cases.items():
        with pytest.raises(BadInputError, match=match):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(BadInputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_failed_write_keeps_the_previous_file(run, tmp_path):
    ck = load_checkpoint(run.checkpoint)
    target = tmp_path / "run.pt"
    save_checkpoint(ck, target)
    before = target.read_bytes()
    ck.metrics = {"bad": lambda: None}  # cannot be serialised
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(ck, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


# -- official AdapterTune checkpoints ---------------------------------------------------------------

def make_official(path, seed=0, every=2, rank=4, num_classes=5):
    """A checkpoint laid out like the official trainer's: {"model": full state dict, "optimizer", "epoch"}."""
    model = create_backbone(tiny_spec(num_classes, seed))
    inject_adapters(model, AdapterConfig(rank=rank, every=every))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n or n.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 49}, path)
    return model.eval()


def test_official_checkpoint_imports_and_computes_the_same(tmp_path):
    official = make_official(tmp_path / "best.pt")
    ck = convert_official(tmp_path / "best.pt", TINY_BACKBONE, tmp_path / "run.pt",
                          backbone_weights=tmp_path / "best.pt", model_args=dict(TINY_ARGS),
                          class_names=list("abcde"))
    assert (ck.adapter.rank, ck.adapter.every) == (4, 2) and ck.model.class_names == list("abcde")
    loaded = load_checkpoint(tmp_path / "run.pt")
    assert loaded.model.source["kind"] == "file" and not any(".block." in k for k in loaded.state_dict)
    model = build_model(loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), official(_x()), atol=1e-6, rtol=1e-6)


def test_official_checkpoint_on_another_backbone_is_refused(tmp_path):
    make_official(tmp_path / "best.pt", seed=0)
    other = create_backbone(tiny_spec(5, seed=1))
    torch.save(backbone_tensors(other), tmp_path / "other.pt")
    with pytest.raises(IncompatibleCheckpointError, match="backbone tensors differ"):
        convert_official(tmp_path / "best.pt", TINY_BACKBONE, tmp_path / "run.pt",
                         backbone_weights=tmp_path / "other.pt", model_args=dict(TINY_ARGS))
    with pytest.raises(BadInputError, match="3 names for a head with 5 classes"):
        convert_official(tmp_path / "best.pt", TINY_BACKBONE, tmp_path / "run.pt",
                         backbone_weights=tmp_path / "best.pt", model_args=dict(TINY_ARGS), class_names=list("abc"))
    assert not (tmp_path / "run.pt").exists()


def test_backbone_weights_of_another_shape_are_refused(tmp_path):
    wide = create_backbone(ModelSpec(TINY_BACKBONE, 5, {**TINY_ARGS, "embed_dim": 96, "num_heads": 3}))
    torch.save(backbone_tensors(wide), tmp_path / "wide.pt")
    with pytest.raises(IncompatibleCheckpointError, match="does not fit"):
        create_backbone(tiny_spec(), weights=tmp_path / "wide.pt")


def test_random_backbone_does_not_depend_on_class_count():
    """Tasks with different heads on one random backbone share its fingerprint (multi-task serving)."""
    from _helpers import tiny_spec

    from atexport.models import backbone_fingerprint, create_backbone

    a, b = create_backbone(tiny_spec(num_classes=5)), create_backbone(tiny_spec(num_classes=9))
    assert backbone_fingerprint(a) == backbone_fingerprint(b)
    assert a.get_classifier().out_features == 5 and b.get_classifier().out_features == 9
    c = create_backbone(tiny_spec(num_classes=5, seed=1))
    assert backbone_fingerprint(c) != backbone_fingerprint(a)
