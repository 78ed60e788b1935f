"""The analysis commands: rank sweeps (resumable, table, JSON, plot, elbow), adapter spectra, run reports."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from _helpers import make_checkpoint
from atexport.analysis import analyze_checkpoint, build_report, effective_rank, elbow, run_sweep
from atexport.analysis.sweep import cell_state
from atexport.checkpoint import load_checkpoint, save_checkpoint
from atexport.cli import cli
from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.training import TrainConfig, train

BASE = dict(
    dataset="digits", dataset_args={"size": 64}, backbone="vit_tiny_patch16_224", pretrained=False,
    model_args={"depth": 2, "embed_dim": 32, "num_heads": 2, "global_pool": "avg"}, img_size=32, patch_size=8,
    epochs=1, warmup_epochs=0, batch_size=32, lr=1e-2, workers=0, hflip=0.0, scale=[0.85, 1.0],
    limit_train=64, limit_eval=32, progress=False,
)


def base(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **kw})


def quiet(line):
    return None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The tiny digits recipe: 2 ranks x 2 seeds, 1 epoch, 64 training images (a few seconds)."""
    out = tmp_path_factory.mktemp("sweep")
    return run_sweep(base(), ranks="2,4", seeds="0,1", output=out, log=quiet)


def png_is_not_blank(path) -> None:
    with Image.open(path) as im:
        im.load()
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert im.size[0] > 200 and im.size[1] > 200
    assert a.std() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 20


# -- sweep ----------------------------------------------------------------------------------------

def test_sweep_writes_the_table_the_json_and_a_plot(sweep):
    out = sweep.output
    assert sorted(sweep.trained) == ["adaptertune_r2_e1/seed_0", "adaptertune_r2_e1/seed_1",
                                     "adaptertune_r4_e1/seed_0", "adaptertune_r4_e1/seed_1"]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] and summary["grid"]["ranks"] == [2, 4] and summary["grid"]["seeds"] == [0, 1]
    (series,) = summary["series"]
    for cell in series["cells"]:
        runs = [load_checkpoint(out / f"adaptertune_r{cell['rank']}_e1" / f"seed_{s}" / "run.pt").metrics
                for s in (0, 1)]
        accs = [m["test_top1"] for m in runs]
        assert cell["mean"] == pytest.approx(np.mean(accs)) and cell["std"] == pytest.approx(np.std(accs, ddof=1))
        assert cell["trainable"] == runs[0]["params"]["trainable"]
        per = 2 * 32 * cell["rank"] + cell["rank"] + 32
        assert cell["trainable"] == 2 * per + 32 * 10 + 10  # 2 adapters + head
    assert series["elbow"] == elbow([(c["rank"], c["mean"]) for c in series["cells"]], 0.5)
    md = (out / "sweep.md").read_text()
    assert "| adaptertune | 1 | 2 |" in md and "| adaptertune | 1 | 4 |" in md and "elbow at rank" in md
    assert "% of full fine-tuning" in md
    png_is_not_blank(out / "sweep.png")


def test_sweep_skips_finished_cells_and_resumes_interrupted_ones(sweep):
    again = run_sweep(base(), ranks="2,4", seeds="0,1", output=sweep.output, log=quiet)
    assert again.trained == [] and len(again.skipped) == 4
    assert again.summary["series"] == sweep.summary["series"]
    # an interrupted cell: 2 epochs asked, stopped after the first (last.pt, no test score)
    cell = sweep.output / "adaptertune_r8_e1" / "seed_0"

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(base(rank=8, epochs=2, output=str(cell)), log=quiet, on_epoch_end=stop)
    assert cell_state(cell) == "interrupted"
    res = run_sweep(base(epochs=2), ranks="8", seeds="0", output=sweep.output, log=quiet)
    assert res.trained == ["adaptertune_r8_e1/seed_0"] and cell_state(cell) == "finished"
    rows = [json.loads(l) for l in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows[:2]] == [1, 2] and rows[2]["event"] == "test"  # then the best epoch's test


def test_sweep_refuses_cells_trained_with_other_settings(sweep):
    with pytest.raises(IncompatibleCheckpointError, match="lr: 0.01 -> 0.02"):
        run_sweep(base(lr=2e-2), ranks="2", seeds="0", output=sweep.output, log=quiet)


@pytest.mark.parametrize("kw,match", [
    (dict(ranks="0,2"), "--ranks"),
    (dict(ranks="2,x"), "--ranks"),
    (dict(ranks="2,2"), "each value once"),
    (dict(everies="0"), "--every"),
    (dict(seeds="0,0"), "--seeds"),
    (dict(families=["ada ring"]), "--adapter"),
    (dict(tolerance=-1.0), "--tolerance"),
])
def test_bad_sweep_flags_are_refused(tmp_path, kw, match):
    args = {"ranks": "2", **kw}
    with pytest.raises(BadInputError, match=match):
        run_sweep(base(), output=tmp_path / "s", log=quiet, **args)


def test_sweep_needs_the_adapter_regime(tmp_path):
    with pytest.raises(BadInputError, match="regime is 'head'"):
        run_sweep(base(regime="head"), ranks="2", output=tmp_path, log=quiet)


@pytest.mark.parametrize("points,tol,rank", [
    ([(1, 50.0), (2, 70.0), (4, 89.8), (8, 90.0), (16, 90.1)], 0.5, 4),   # plateau from 4
    ([(1, 50.0), (2, 70.0), (4, 89.8), (8, 90.0), (16, 90.1)], 0.0, 16),  # strict: the best itself
    ([(1, 80.0), (2, 79.0)], 0.5, 1),                                     # smaller rank is best
    ([(4, 60.0), (2, 60.0)], 0.5, 2),                                     # unsorted input
])
def test_elbow_is_the_smallest_rank_within_tolerance_of_the_best(points, tol, rank):
    assert elbow(points, tol)["rank"] == rank


def test_sweep_cli(tmp_path):
    r = CliRunner().invoke(cli, [
        "sweep", "--recipe", "digits", "--backbone", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32",
        "--patch-size", "8", "--set", "model_args={depth: 2, embed_dim: 32, num_heads: 2, global_pool: avg}",
        "--epochs", "1", "--warmup-epochs", "0", "--limit-train", "32", "--limit-eval", "16", "--workers", "0",
        "--ranks", "1,2", "--seeds", "0", "--no-progress", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "trained 2 cells" in r.output and "elbow at rank" in r.output and "sweep.png" in r.output
    r = CliRunner().invoke(cli, ["sweep", "--recipe", "digits", "--ranks", "4", "--adapter", "nosuchfamily",
                                 "-o", str(tmp_path / "t")])
    assert r.exit_code == 2 and "nosuchfamily" in r.output and "unknown adapter family" in r.output, r.output
    assert not (tmp_path / "t").exists()  # refused before anything was written


# -- analyze --------------------------------------------------------------------------------------

def _set_rank3(path, sigmas=(3.0, 2.0, 1.0), rank=8, dim=64):
    """Give every adapter the update U diag(sigmas) V^T (rank 3) with orthonormal U, V, in a rank-8 adapter."""
    ck = load_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    for k in [k for k in ck.state_dict if k.endswith(".adapter.down.weight")]:
        u, _ = torch.linalg.qr(torch.randn(dim, 3, generator=g))
        v, _ = torch.linalg.qr(torch.randn(dim, 3, generator=g))
        up, down = torch.zeros(dim, rank), torch.zeros(rank, dim)
        up[:, :3] = u * torch.tensor(sigmas)
        down[:3] = v.T
        ck.state_dict[k] = down
        ck.state_dict[k.replace(".down.", ".up.")] = up
    save_checkpoint(ck, path)
    return path


@pytest.mark.parametrize("sigmas,expected", [
    ((1.0, 1.0, 1.0), {"90": 3, "95": 3, "99": 3}),
    ((3.0, 2.0, 1.0), {"90": 2, "95": 3, "99": 3}),  # energy 9/14, 13/14, 14/14
])
def test_analyze_finds_the_rank_of_a_known_update(tmp_path, sigmas, expected):
    ckpt = _set_rank3(make_checkpoint(tmp_path / "run.pt", rank=8), sigmas)
    res = analyze_checkpoint(ckpt, tmp_path / "an")
    assert len(res.summary["adapters"]) == 4
    for a in res.summary["adapters"]:
        assert a["effective_rank"] == expected
        assert a["singular_values"][:3] == pytest.approx(sorted(sigmas, reverse=True), rel=1e-5)
        assert max(a["singular_values"][3:]) < 1e-5
    assert res.recommended_rank == 4 and "r = 4" in res.reasoning[1]  # next power of two >= 3, below r = 8
    assert json.loads((tmp_path / "an" / "spectrum.json").read_text())["recommended_rank"] == 4
    png_is_not_blank(tmp_path / "an" / "spectrum.png")


def test_analyze_cli_prints_the_reasoning(tmp_path):
    ckpt = _set_rank3(make_checkpoint(tmp_path / "run.pt", rank=8))
    r = CliRunner().invoke(cli, ["analyze", "--ckpt", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert "recommended rank: 4" in r.output and "blocks.0.adapter" in r.output
    assert (tmp_path / "analysis" / "spectrum.md").is_file()


def test_analyze_a_saturated_and_a_zero_adapter(tmp_path):
    full = analyze_checkpoint(make_checkpoint(tmp_path / "a.pt", rank=4), tmp_path / "a")  # random: full rank
    assert full.recommended_rank == 8 and "may be limiting" in full.reasoning[1]
    ck = load_checkpoint(make_checkpoint(tmp_path / "z.pt", rank=4))
    ck.state_dict = {k: (torch.zeros_like(v) if ".adapter.up." in k else v) for k, v in ck.state_dict.items()}
    save_checkpoint(ck, tmp_path / "z.pt")
    zero = analyze_checkpoint(tmp_path / "z.pt", tmp_path / "z")
    assert zero.recommended_rank is None and "zero" in zero.reasoning[0]


def test_effective_rank_edge_cases():
    assert effective_rank([0, 0], 0.9) == 0
    assert effective_rank([1.0], 0.99) == 1
    assert effective_rank([2.0, 1.0, 0.0], 0.8) == 1 and effective_rank([2.0, 1.0, 0.0], 0.81) == 2


# -- report ---------------------------------------------------------------------------------------

def test_report_on_two_runs_matches_their_metrics(sweep, tmp_path):
    a = sweep.output / "adaptertune_r2_e1" / "seed_0"
    b = sweep.output / "adaptertune_r4_e1" / "seed_1"
    verify = {"dataset": "digits", "split": "test", "samples": 32, "passed": True,
              "reference": {"name": "pytorch", "precision": "fp32", "accuracy": 0.5, "agreement": 1.0},
              "backends": [{"name": "onnxruntime", "precision": "int8", "accuracy": 0.46875, "agreement": 0.9375}]}
    (a / "verify").mkdir(exist_ok=True)
    (a / "verify" / "verify.json").write_text(json.dumps(verify))
    res = build_report([a, b], tmp_path / "rep")
    rows = {r["method"]: r["cells"]["digits"] for r in res.summary["rows"]}
    assert set(rows) == {"adaptertune r2", "adaptertune r4"}
    for name, folder in (("adaptertune r2", a), ("adaptertune r4", b)):
        m = load_checkpoint(folder / "run.pt").metrics
        assert rows[name]["values"] == [m["test_top1"]] and rows[name]["trainable"] == m["params"]["trainable"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{rows['adaptertune r2']['mean']:.2f} +- 0.00 (n=1)" in md
    assert "| onnxruntime | int8 | 46.88 | 93.75 |" in md
    curves = res.files["curves"]
    assert len(curves) == 2
    for p in curves:
        png_is_not_blank(p)
    history = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]["history"]
    assert [h["train_loss"] for h in history] == [json.loads(l)["train_loss"]
                                                  for l in (a / "metrics.jsonl").read_text().splitlines()[:-1]]


def test_report_groups_seeds(sweep, tmp_path):
    r = CliRunner().invoke(cli, ["report", str(sweep.output / "adaptertune_r2_e1"), "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    (row,) = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    cell = row["cells"]["digits"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(sweep.summary["series"][0]["cells"][0]["mean"])


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing", "no such run folder"),
    (lambda p: p, "holds no finished or running atexport run"),
])
def test_report_refuses_folders_without_runs(tmp_path, make, match):
    with pytest.raises(BadInputError, match=match):
        build_report([make(tmp_path)], tmp_path / "r")


def test_without_matplotlib_json_and_markdown_are_still_written(sweep, tmp_path, monkeypatch):
    from atexport.analysis import plots

    monkeypatch.setattr(plots, "matplotlib_or_none", lambda: None)
    res = build_report([sweep.output / "adaptertune_r2_e1"], tmp_path / "r")
    assert res.notes == [plots.NO_PLOT] and (tmp_path / "r" / "report.md").is_file()
    assert (tmp_path / "r" / "report.json").is_file() and not (tmp_path / "r" / "curves").exists()
    an = analyze_checkpoint(_set_rank3(make_checkpoint(tmp_path / "run.pt", rank=8)), tmp_path / "an")
    assert an.notes == [plots.NO_PLOT] and "plot" not in an.files and (tmp_path / "an" / "spectrum.json").is_file()


# -- progress -------------------------------------------------------------------------------------

def test_progress_writes_one_line_per_step_with_an_eta_off_a_terminal():
    import io

    from atexport.utils.progress import Progress, format_seconds, progress_mode

    assert progress_mode(True, io.StringIO()) == "lines" and progress_mode(False) == "lines"
    lines = []
    with Progress(4, "sweep", log=lines.append, stream=io.StringIO(), unit="cell") as p:
        for i in range(4):
            p.update(1, postfix=f"cell {i}")
    assert len(lines) == 4 and lines[0].startswith("sweep 1/4 (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("sweep 4/4 (100%)") and lines[-1].endswith("cell 3") and "ETA 0s" in lines[-1]
    quiet_lines = []
    with Progress(3, "x", log=quiet_lines.append, enabled=False, lines=False) as p:
        p.update(3)
    assert quiet_lines == []
    assert [format_seconds(s) for s in (5, 75.2, 3725, None)] == ["5s", "1m15s", "1h02m", "?"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, lines = Terminal(), []
    assert progress_mode(True, term) == "bar" and progress_mode(False, term) == "lines"
    with Progress(2, "train", log=lines.append, stream=term, unit="batch") as p:
        p.update(2, postfix="loss 0.5")
    assert lines == [] and "train:" in term.getvalue() and "/2 [" in term.getvalue()  # a tqdm bar, no lines


def test_sweep_under_torchrun_splits_the_cells_between_processes(tmp_path):
    """torchrun (gloo on CPU) as the launcher: process k trains cells i % 2 == k, rank 0 summarises."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "atexport", "sweep",
           "--recipe", "digits", "--backbone", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32",
           "--patch-size", "8", "--set", "model_args={depth: 2, embed_dim: 32, num_heads: 2, global_pool: avg}",
           "--epochs", "1", "--warmup-epochs", "0", "--limit-train", "32", "--limit-eval", "16", "--workers", "0",
           "--ranks", "1,2", "--seeds", "0", "--no-progress", "-o", str(tmp_path / "s")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[rank 0/2] sweep 1/1" in p.stderr and "[rank 1/2] sweep 1/1" in p.stderr
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert summary["complete"] and summary["processes"] == 2
    assert [c["n"] for c in summary["series"][0]["cells"]] == [1, 1]


def test_other_adapter_families_sweep_and_analyze(tmp_path):
    """AdaRing (materialised per-layer matrices), Adapter-X (one pair per shared expert), LoRA (q and v)."""
    res = run_sweep(base(model_args={"depth": 2, "embed_dim": 32, "num_heads": 2}, limit_train=32, limit_eval=16),
                    ranks="2", seeds="0", families=["adaring", "adapterx", "lora"], output=tmp_path, log=quiet)
    assert [s["label"] for s in res.summary["series"]] == ["adaring", "adapterx", "lora"] and res.summary["complete"]
    names = {}
    for kind in ("adaring", "adapterx", "lora"):
        ckpt = tmp_path / f"{kind}_r2_e1" / "seed_0" / "run.pt"
        assert load_checkpoint(ckpt).config["adapter"]["kind"] == kind
        an = analyze_checkpoint(ckpt, tmp_path / f"an_{kind}")
        assert an.summary["kind"] == kind and an.summary["rank"] == 2 and all(len(a["singular_values"]) == 2 for a in an.summary["adapters"])
        names[kind] = [a["name"] for a in an.summary["adapters"]]
    assert names["adaring"] == ["blocks.0.adapter", "blocks.1.adapter"]
    assert names["adapterx"] == [f"shared.adapter.experts[{k}]" for k in range(4)]
    assert names["lora"] == ["blocks.0.attn.qkv.adapter.q", "blocks.0.attn.qkv.adapter.v",
                             "blocks.1.attn.qkv.adapter.q", "blocks.1.attn.qkv.adapter.v"]


def _fake_run(folder, config: str, top1: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "train_top1": 50.0}) + "\n"
                                          + json.dumps({"event": "test", "epoch": 1, "test_top1": top1}) + "\n")


def test_report_never_averages_runs_of_different_backbones(tmp_path):
    """N10: one row per backbone (name and architecture overrides), seeds of one backbone averaged."""
    common = "dataset: digits\nbackbone: vit_tiny_patch16_224\nrank: 4\n"
    _fake_run(tmp_path / "runs" / "a0", common + "seed: 0\nmodel_args: {depth: 1}\n", 60.0)
    _fake_run(tmp_path / "runs" / "a1", common + "seed: 1\nmodel_args: {depth: 1}\n", 70.0)
    _fake_run(tmp_path / "runs" / "b0", common + "seed: 0\nmodel_args: {depth: 2}\n", 90.0)
    _fake_run(tmp_path / "runs" / "c0", "dataset: digits\nbackbone: vit_small_patch16_224\nrank: 4\nseed: 0\n", 80.0)
    res = build_report([tmp_path / "runs"], tmp_path / "rep", curves=False)
    rows = {r["backbone"]: r["cells"]["digits"] for r in res.summary["rows"]}
    assert {k: (v["n"], v["mean"]) for k, v in rows.items()} == {
        "vit_tiny_patch16_224 (depth=1)": (2, 65.0), "vit_tiny_patch16_224 (depth=2)": (1, 90.0),
        "vit_small_patch16_224": (1, 80.0)}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| backbone | method | digits |" in md and "vit_small_patch16_224" in md


def test_report_of_sweep_runs_tells_backbones_apart_by_their_weights(sweep, tmp_path):
    """N10: runs of one name whose backbone weights differ (run.pt fingerprints) are two rows."""
    import shutil

    import torch

    a = sweep.output / "adaptertune_r2_e1" / "seed_0"
    b = tmp_path / "other" / "seed_0"
    shutil.copytree(a, b)
    doc = torch.load(b / "run.pt", weights_only=True)
    doc["backbone"]["fingerprint"] = "f" * 64
    torch.save(doc, b / "run.pt")
    res = build_report([a, b], tmp_path / "rep", curves=False)
    labels = sorted(r["backbone"] for r in res.summary["rows"])
    assert len(labels) == 2 and any("[weights ffffffff]" in x for x in labels), labels
