"""The training stage: config and recipes, the schedule, regimes, learning, resume, seeds."""

import json
import math

import pytest
import torch
import yaml

from atexport import configs
from atexport.checkpoint import load_checkpoint
from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.models import backbone_tensors, create_backbone
from atexport.training import TrainConfig, lr_at, resolve_config, train

TINY = dict(
    dataset="digits", backbone="vit_tiny_patch16_224", pretrained=False,
    model_args={"depth": 4, "embed_dim": 64, "num_heads": 2, "global_pool": "avg"}, img_size=32, patch_size=8,
    rank=4, epochs=2, warmup_epochs=0, batch_size=32, lr=1e-2, workers=0, hflip=0.0, scale=[0.85, 1.0],
    progress=False,
)


def tiny(out, **kw) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "output": str(out), **kw})


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A tiny adapter run on the digits, long enough to learn (about 5 s)."""
    out = tmp_path_factory.mktemp("learned")
    return train(tiny(out, epochs=6, warmup_epochs=1), log=lambda s: None)


# -- config and recipes ---------------------------------------------------------------------------

def test_defaults_recipe_is_the_dataclass_defaults_is_the_paper():
    rec = configs.load("training", "defaults")
    rec.pop("_source")
    assert TrainConfig.from_dict(rec) == TrainConfig()
    c = TrainConfig()
    paper = dict(rank=16, every=1, alpha=1.0, init="zero", lr=1e-3, weight_decay=0.05, epochs=50,
                 warmup_epochs=5, clip_grad=1.0, batch_size=128, val_fraction=0.1, regime="adapter", hflip=0.5)
    assert {k: getattr(c, k) for k in paper} == paper


@pytest.mark.parametrize("name", configs.available("training"))
def test_every_recipe_resolves(name):
    cfg = resolve_config(name, {"dataset": "digits"} if name == "defaults" else None)
    assert cfg.dataset and cfg.epochs >= 1


def test_precedence_recipe_then_set_then_flags():
    cfg = resolve_config("pets", {"lr": 5e-4, "model_args": {"drop_path_rate": 0.1}})
    assert (cfg.dataset, cfg.lr, cfg.weight_decay, cfg.model_args) == ("pets", 5e-4, 0.05, {"drop_path_rate": 0.1})
    assert resolve_config(None, {"dataset": "digits"}).recipe == "digits"  # the data set's own recipe
    assert resolve_config(None, {"dataset": "imagefolder:/x"}).recipe == "defaults"
    assert resolve_config("digits", {"model_args": {"depth": 2}}).model_args == {"depth": 2, "global_pool": "avg"}
    # --set model_args.patch_size is the patch_size key: it beats the digits recipe's patch_size 8, a flag beats it
    sized = resolve_config("digits", {"model_args": {"patch_size": 16, "img_size": 224}})
    assert sized.resolved_model_args()["patch_size"] == 16 and sized.resolved_model_args()["img_size"] == 224
    assert resolve_config("digits", {"model_args": {"patch_size": 16}, "patch_size": 4}).resolved_model_args()[
        "patch_size"] == 4


@pytest.mark.parametrize("kw,match", [
    (dict(lerning_rate=1.0), "lerning_rate"),
    (dict(warmup_epochs=5, epochs=3), "--warmup-epochs 5 must be 0 or smaller than --epochs 3"),
    (dict(lr=0), "--lr must be positive"),
    (dict(regime="lora"), "--regime"),
    (dict(rank=0), "--rank must be at least 1"),
    (dict(epochs="many"), "epochs: expected int"),
    (dict(scale=[0.5]), "scale must be a list of two"),
    (dict(seeds="0,x"), "--seeds"),
    (dict(device="tpu"), "--device"),
])
def test_bad_values_are_refused_clearly(kw, match):
    with pytest.raises(BadInputError, match=match):
        TrainConfig.from_dict({**TINY, **kw})


def test_yaml_strings_are_coerced():
    cfg = TrainConfig.from_dict({**TINY, "lr": "1e-3", "epochs": 3.0, "seeds": "2, 0", "clip_grad": 0})
    assert (cfg.lr, cfg.epochs, cfg.seeds, cfg.clip_grad) == (1e-3, 3, [2, 0], None)


def test_schedule_is_linear_warmup_then_per_step_cosine():
    base, total, warm = 1e-3, 100, 10
    lrs = [lr_at(s, base, total, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm) and lrs[9] == pytest.approx(base)
    assert lrs[10] == pytest.approx(base)
    assert lrs[55] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-6
    assert lr_at(0, base, 10, 0) == pytest.approx(base)


# -- what trains ----------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_beats_chance(learned):
    losses = [h["train_loss"] for h in learned.history]
    assert losses[-1] < losses[0] - 0.5
    assert learned.metrics["test_top1"] > 40.0  # chance is 10%
    assert learned.metrics["val_top1"] == max(h["val_top1"] for h in learned.history)


def test_backbone_is_bit_identical_and_only_adapters_and_head_moved(learned):
    ckpt = load_checkpoint(learned.checkpoint)
    fresh = create_backbone(ckpt.model)  # the same seeded random backbone, untouched
    trained = backbone_tensors(learned.model)
    ref = backbone_tensors(fresh)
    assert trained.keys() == ref.keys()
    assert all(torch.equal(trained[k], ref[k]) for k in ref)
    # The adapters' up projections start at zero; training moved them and the head.
    ups = [p for n, p in learned.model.named_parameters() if ".adapter.up.weight" in n]
    assert len(ups) == 4 and all(p.abs().max() > 0 for p in ups)
    assert set(ckpt.state_dict) == {n for n in learned.model.state_dict() if ".adapter." in n or n.startswith("head.")}


def test_parameter_report_counts_2Dr_plus_r_plus_D(learned):
    p = learned.metrics["params"]
    per = 2 * 64 * 4 + 4 + 64
    assert p["per_adapter"] == per and p["num_adapters"] == 4 and p["adapters"] == 4 * per
    assert p["head"] == 64 * 10 + 10 and p["trainable"] == 4 * per + 650
    full = sum(t.numel() for n, t in learned.model.named_parameters() if ".adapter." not in n)
    assert p["full_finetune"] == full and p["share"] == pytest.approx(p["trainable"] / full)


def test_output_layout(learned):
    out = learned.output
    assert {p.name for p in out.iterdir()} >= {"run.pt", "last.pt", "metrics.jsonl", "config.yaml"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines[:-1]] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["event"] == "test" and lines[-1]["test_top1"] == learned.metrics["test_top1"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert "resume" not in saved and saved["rank"] == 4
    again = resolve_config(out / "config.yaml", {"output": str(out)})
    assert again.to_dict(record=True) == tiny(out, epochs=6, warmup_epochs=1).to_dict(record=True)
    ckpt = load_checkpoint(learned.checkpoint)
    assert ckpt.config == saved and ckpt.resume is None and ckpt.metrics["test_top1"] is not None
    assert ckpt.preprocess["input_size"] == [3, 32, 32] and ckpt.model.class_names[3] == "3"
    assert load_checkpoint(learned.last).resume["epoch"] == 6


@pytest.mark.parametrize("regime", ["head", "full"])
def test_head_and_full_regimes(tmp_path, regime):
    r = train(tiny(tmp_path / regime, regime=regime, epochs=1, limit_train=64, limit_eval=32), log=lambda s: None)
    ck = load_checkpoint(r.checkpoint)
    assert ck.adapter is None and not any(".adapter." in n for n in ck.state_dict)
    fresh = backbone_tensors(create_backbone(ck.model))
    moved = backbone_tensors(r.model)
    same = all(torch.equal(fresh[k], moved[k]) for k in fresh)
    if regime == "head":
        assert same and set(ck.state_dict) == {"head.weight", "head.bias"}
        assert r.metrics["params"]["trainable"] == 650
    else:
        assert not same and set(ck.state_dict) == set(r.model.state_dict())
        assert r.metrics["params"]["share"] == 1.0


def test_full_run_serves_as_backbone_weights_for_adapters(tmp_path):
    full = train(tiny(tmp_path / "full", regime="full", epochs=1, limit_train=64, limit_eval=32), log=lambda s: None)
    ad = train(tiny(tmp_path / "ad", backbone_weights=str(full.checkpoint), epochs=1, limit_train=64, limit_eval=32),
               log=lambda s: None)
    ck = load_checkpoint(ad.checkpoint)
    assert ck.model.source["kind"] == "file" and len(ck.model.source["sha256"]) == 64
    assert ck.fingerprint != load_checkpoint(full.checkpoint).fingerprint  # the domain-adapted backbone
    with pytest.raises(BadInputError, match="holds no backbone"):
        train(tiny(tmp_path / "x", backbone_weights=str(ad.checkpoint), epochs=1, limit_train=32), log=lambda s: None)


# -- resume, seeds, outputs -------------------------------------------------------------------------

class _Stop(KeyboardInterrupt):
    pass


def _interrupt_after(epoch):
    def hook(row):
        if row["epoch"] == epoch:
            raise _Stop()
    return hook


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_after_an_interruption_reaches_the_same_state(tmp_path, workers):
    kw = dict(epochs=3, warmup_epochs=1, limit_train=160, limit_eval=64, workers=workers)
    whole = train(tiny(tmp_path / "whole", **kw), log=lambda s: None)
    with pytest.raises(_Stop):
        train(tiny(tmp_path / "cut", **kw), log=lambda s: None, on_epoch_end=_interrupt_after(1))
    assert load_checkpoint(tmp_path / "cut" / "last.pt").resume["epoch"] == 1
    lines = []
    resumed = train(tiny(tmp_path / "cut", resume=True, **kw), log=lines.append)
    assert any("resuming" in x for x in lines)
    a, b = load_checkpoint(whole.last).state_dict, load_checkpoint(resumed.last).state_dict
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    strip = lambda h: [{k: v for k, v in x.items() if k not in ("time_s", "img_per_s")} for x in h]  # noqa: E731
    for x, y in zip(strip(whole.history), strip(resumed.history)):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], (int, float)) and not isinstance(x[k], bool):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k
            else:  # strings such as the history's "event": pytest >= 9.2 refuses approx on them
                assert x[k] == y[k], k
    assert resumed.metrics["test_top1"] == pytest.approx(whole.metrics["test_top1"])
    # Resuming a finished run only reports it.
    again = train(tiny(tmp_path / "cut", resume=True, **kw), log=lines.append)
    assert "already complete" in lines[-1] and again.metrics["test_top1"] == resumed.metrics["test_top1"]


def test_resume_refuses_other_settings_and_missing_runs(tmp_path):
    kw = dict(epochs=2, limit_train=32, limit_eval=16)
    with pytest.raises(BadInputError, match="nothing to resume"):
        train(tiny(tmp_path / "none", resume=True, **kw), log=lambda s: None)
    train(tiny(tmp_path / "r", **kw), log=lambda s: None)
    with pytest.raises(IncompatibleCheckpointError, match=r"lr: 0.01 -> 0.02"):
        train(tiny(tmp_path / "r", resume=True, lr=2e-2, **kw), log=lambda s: None)
    with pytest.raises(BadInputError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny(tmp_path / "r", **kw), log=lambda s: None)
    r = train(tiny(tmp_path / "r", overwrite=True, seed=3, **kw), log=lambda s: None)
    assert load_checkpoint(r.checkpoint).config["seed"] == 3


def test_seeds_write_one_run_each_and_a_summary(tmp_path):
    r = train(tiny(tmp_path / "s", seeds="0,1", epochs=1, limit_train=64, limit_eval=32), log=lambda s: None)
    assert [x.config["seed"] for x in r.runs] == [0, 1]
    assert (tmp_path / "s" / "seed_0" / "run.pt").is_file() and (tmp_path / "s" / "seed_1" / "last.pt").is_file()
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    vals = [x.metrics["test_top1"] for x in r.runs]
    assert s["test_top1"]["values"] == vals and s["test_top1"]["mean"] == pytest.approx(sum(vals) / 2)
    assert s["test_top1"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert "+-" in r.summary_line()


def test_checkpoint_of_vit_small_adapters_is_small():
    """rank 16 on every block of vit_small: 0.17 M adapter + head tensors, under 1 MB (not 88 MB)."""
    import io

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import trainable_state
    from atexport.models import ModelSpec

    model = create_backbone(ModelSpec("vit_small_patch16_224", 37, {}, {"kind": "random", "seed": 0}))
    inject_adapters(model, AdapterConfig(rank=16))
    buf = io.BytesIO()
    torch.save(trainable_state(model, "adapter"), buf)
    assert 0.5e6 < buf.tell() < 1.0e6
    n = sum(t.numel() for t in trainable_state(model, "adapter").values())
    assert n == 12 * (2 * 384 * 16 + 16 + 384) + 384 * 37 + 37


@pytest.mark.gpu
def test_amp_training_on_cuda(tmp_path):
    for amp in ("bf16", "fp16"):
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            continue
        r = train(tiny(tmp_path / amp, device="cuda", amp=amp, epochs=1, limit_train=64, limit_eval=32),
                  log=lambda s: None)
        assert math.isfinite(r.metrics["test_loss"])
        assert next(r.model.parameters()).device.type == "cuda"


def test_importing_the_stage_stays_light():
    import subprocess
    import sys

    from atexport.adapter import INITS
    from atexport.training.config import INITS as CONFIG_INITS

    assert CONFIG_INITS == INITS
    code = "import sys, atexport.training, atexport.data, atexport.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
