"""``atexport verify`` and ``atexport bench`` on multi-task models: each task against its own PyTorch
model, mixed-task batches against the model's single-task rows, a corrupted task slice failing by name,
and benchmarks of one task or of mixed batches.

Three tasks (10, 3 and 5 classes) on one backbone file (see ``tests/test_multitask.py`` for why a file);
the 10-class task runs on the offline digits data set, the others on small image folders of their own.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_multitask import _backbone_file, _task_ckpt

from atexport.errors import BadInputError, IncompatibleCheckpointError, ParityError

LIMIT = 8
CLASSES = {"t10": 10, "t3": 3, "t5": 5}


@pytest.fixture(scope="session")
def vm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mt_verify")


@pytest.fixture(scope="session")
def vm_ckpts(vm_dir):
    bb = _backbone_file(vm_dir / "backbone.pt")
    return {name: _task_ckpt(vm_dir / f"{name}.pt", bb, c, weight_seed=40 + i) for i, (name, c) in
            enumerate(CLASSES.items())}


@pytest.fixture(scope="session")
def vm_model(vm_dir, vm_ckpts):
    from atexport.export.multitask import export_multitask
    from atexport.export.settings import ExportSettings

    return export_multitask(list(vm_ckpts.values()), vm_dir / "tasks.onnx", ExportSettings(verify=False)).path


@pytest.fixture(scope="session")
def vm_fp16(vm_model, vm_dir):
    from atexport.export.precision import convert_precision

    return convert_precision(vm_model, "fp16", vm_dir / "tasks.fp16.onnx", verify=False).path


def _folder(root, classes: int):
    """``imagefolder:`` data of ``classes`` classes (digits images 0..classes-1, two test images each)."""
    from atexport.data import load_dataset

    ds = load_dataset("digits", "test")
    seen = {}
    for k, label in enumerate(ds.targets):
        if label < classes and seen.get(label, 0) < 3:
            split = "train" if seen.get(label, 0) == 0 else "test"
            d = root / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            ds.load(k).save(d / f"{k}.png")
            seen[label] = seen.get(label, 0) + 1
    return f"imagefolder:{root}"


@pytest.fixture(scope="session")
def folders(vm_dir):
    return {"t3": _folder(vm_dir / "data3", 3), "t5": _folder(vm_dir / "data5", 5)}


def _perturb(model, out, tensor, index, cols, delta=0.5):
    """A copy of the model with one task's slice of a bank tensor moved by ``delta`` (last axis ``cols``)."""
    proto = onnx.load(str(model))
    init = next(i for i in proto.graph.initializer if i.name == tensor)
    a = numpy_helper.to_array(init).copy()
    a[index, ..., cols] += delta
    init.CopyFrom(numpy_helper.from_array(a, tensor))
    onnx.save(proto, str(out))
    return out


# ------------------------------------------------------------------------------------------ verify


def test_each_task_against_its_own_model_and_mixed_batches(vm_ckpts, vm_model, vm_fp16, vm_dir):
    from atexport.verify import VerifySettings, verify

    report = vm_dir / "report"
    res = verify(list(vm_ckpts.values()), onnx=vm_model, onnx_fp16=vm_fp16,
                 settings=VerifySettings(dataset="digits", limit=LIMIT, batch_size=4, report=report))
    assert res.passed and [t.task for t in res.tasks] == list(CLASSES)
    for t in res.tasks:
        assert [b.name for b in t.backends] == ["onnxruntime fp32", "onnxruntime fp16"] and t.samples == LIMIT
        fp32, fp16 = t.backends
        assert fp32.parity.max_abs < 1e-5 and fp32.agreement == 1.0
        assert fp16.parity.max_abs > fp32.parity.max_abs  # measured against the task's own PyTorch model
        assert fp32.parity.samples == LIMIT and t.preprocess["passed"]
    t10, t3, _ = res.tasks
    assert t10.backends[0].accuracy == t10.reference.accuracy is not None and t10.accuracy_note is None
    assert t3.reference.accuracy is None and "digits has 10 classes, task t3 3" in t3.accuracy_note
    # mixed batches: every task of both models, rows equal to the model's single-task rows
    assert [(m.name, m.task) for m in res.mixed] == [(n, t) for n in ("onnxruntime fp32", "onnxruntime fp16")
                                                     for t in CLASSES]
    assert all(m.parity.max_abs <= 1e-6 and m.parity.samples == LIMIT for m in res.mixed)
    assert res.mixed[0].tasks_in_batch == list(CLASSES) and res.mixed[0].batch_size == 4
    doc = json.loads((report / "verify.json").read_text())
    assert doc["multitask"] is True and doc["passed"] is True and doc["failures"] == []
    assert [t["task"] for t in doc["tasks"]] == list(CLASSES) and len(doc["mixed"]) == 6
    assert doc["tasks"][1]["indices"] == {str(vm_model): 1, str(vm_fp16): 1}
    assert doc["tasks"][1]["backends"][0]["accuracy"] is None
    md = (report / "verify.md").read_text()
    assert "multi-task): PASSED" in md and "## Mixed-task batches" in md and "| t5 | `t5.pt` | digits |" in md
    assert "t3" in res.table() and "mixed-task batches" in res.table()


def test_bf16_in_openvino_each_task_and_mixed_batches(vm_ckpts, vm_model):
    """BF16 (OpenVINO; emulated where the CPU has no AMX/AVX512-BF16) on a multi-task model: every task against
    its own PyTorch model under the bf16 tolerance row, and mixed batches equal to the model's single-task rows."""
    pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
    from atexport.parity.tolerances import load_tolerances
    from atexport.verify import VerifySettings, verify

    res = verify(list(vm_ckpts.values()), openvino=vm_model,
                 settings=VerifySettings(openvino_precision="bf16", dataset="digits", limit=LIMIT, batch_size=4))
    assert res.passed and [t.task for t in res.tasks] == list(CLASSES)
    bf16 = load_tolerances()["bf16"]
    for t in res.tasks:
        (b,) = t.backends
        assert b.name == "openvino bf16" and b.precision == "bf16" and b.parity.tolerance == bf16
        assert 0 < b.parity.max_abs <= bf16.max_abs and b.parity.samples == LIMIT
    assert [(m.name, m.task) for m in res.mixed] == [("openvino bf16", t) for t in CLASSES]
    assert all(m.passed and m.parity.samples == LIMIT for m in res.mixed)


@pytest.mark.parametrize("tensor,cols,why", [
    ("bank.blocks.2.adapter.up.weight", 0, "max abs diff"),  # an adapter slice: the logits move
    ("bank.head.bias", 4, "padded logits are not -10000"),  # a padded column of the 3-class task
])
def test_a_corrupted_task_slice_fails_naming_that_task(vm_ckpts, vm_model, vm_dir, tensor, cols, why):
    from click.testing import CliRunner

    from atexport.cli import cli

    bad = _perturb(vm_model, vm_dir / f"bad_{tensor}.onnx", tensor, index=1, cols=cols)  # task t3 only
    out = vm_dir / f"bad_report_{cols}"
    args = ["verify", "--onnx", str(vm_model), "--onnx", str(bad), "--dataset", "digits", "--limit", str(LIMIT),
            "--report", str(out)]
    for ck in vm_ckpts.values():
        args += ["--ckpt", str(ck)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == ParityError.exit_code, res.output
    assert "Traceback" not in res.output
    err = res.output[res.output.index("error: verification failed"):]
    assert f"onnxruntime fp32 ({bad.name}) [t3] ({bad}): " in err and why in err
    assert "[t10]" not in err and "[t5]" not in err and f"({vm_model.name})" not in err
    doc = json.loads((out / "verify.json").read_text())
    verdicts = {(t["task"], b["path"]): b["passed"] for t in doc["tasks"] for b in t["backends"]}
    assert [k for k, ok in verdicts.items() if not ok] == [("t3", str(bad))]
    # a corrupted slice is corrupted alike in single and mixed batches; only the padding check sees it there
    mixed_failed = [(m["task"], m["path"]) for m in doc["mixed"] if not m["passed"]]
    assert mixed_failed == ([("t3", str(bad))] if "padded" in why else [])


def test_mixed_check_catches_rows_that_depend_on_their_batch(vm_ckpts, vm_model, monkeypatch):
    """A runtime that served each batch with its first sample's task passes every single-task check; the
    mixed-batch check names the tasks whose rows it got wrong."""
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.verify import VerifySettings, verify

    infer = OnnxRuntimeRunner._infer

    def first_task_only(self, batch, **feeds):
        if "task_id" in feeds:
            feeds["task_id"] = np.full_like(feeds["task_id"], feeds["task_id"][0])
        return infer(self, batch, **feeds)

    monkeypatch.setattr(OnnxRuntimeRunner, "_infer", first_task_only)
    res = verify(list(vm_ckpts.values()), onnx=vm_model, settings=VerifySettings(limit=4), strict=False)
    assert all(b.passed for t in res.tasks for b in t.backends)
    assert [m.task for m in res.mixed if not m.passed] == ["t3", "t5"]  # t10 leads every batch
    with pytest.raises(ParityError, match=r"onnxruntime fp32 mixed-task batch \[t3\] \(.*tasks.onnx\): max abs"):
        res.require_passed()


def test_a_subset_of_tasks_on_their_own_data_sets(vm_ckpts, vm_model, folders):
    from atexport.verify import VerifySettings, verify

    res = verify([vm_ckpts["t5"], vm_ckpts["t3"]], onnx=vm_model,
                 settings=VerifySettings(dataset=[folders["t5"], folders["t3"]]))
    assert res.passed and [(t.task, t.samples) for t in res.tasks] == [("t5", 10), ("t3", 6)]
    assert all(t.reference.accuracy is not None and t.accuracy_note is None for t in res.tasks)
    assert [m.task for m in res.mixed] == ["t5", "t3"] and res.mixed[0].tasks_in_batch == ["t5", "t3"]
    # one task: its rows are interleaved with the model's other tasks
    res = verify(vm_ckpts["t3"], onnx=vm_model, settings=VerifySettings(dataset=folders["t3"]))
    assert res.passed and res.mixed[0].tasks_in_batch == ["t3", "t10", "t5"]
    assert res.mixed[0].parity.samples == 6 and res.mixed[0].parity.max_abs <= 1e-6


def test_verify_refuses_what_it_cannot_check(vm_ckpts, vm_model, vm_dir, folders):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.verify import VerifySettings, verify

    bb = vm_dir / "backbone.pt"
    stranger = _task_ckpt(vm_dir / "stranger.pt", bb, 4, weight_seed=77)
    retrained = _task_ckpt(vm_dir / "retrained" / "t3.pt", bb, 3, weight_seed=78)
    cks = list(vm_ckpts.values())
    two = VerifySettings(limit=2)
    with pytest.raises(IncompatibleCheckpointError,
                       match=r"stranger.pt is not a task of --onnx .*tasks.onnx .*holds: t10 \(t10.pt, 10 classes\), "
                             r"t3 \(t3.pt, 3 classes\), t5"):
        verify([cks[0], stranger], onnx=vm_model, settings=two)
    with pytest.raises(IncompatibleCheckpointError, match="task 't3' was made from other weights.*--replace"):
        verify(retrained, onnx=vm_model, settings=VerifySettings(dataset=folders["t3"], limit=2))
    from _helpers import make_checkpoint

    with pytest.raises(IncompatibleCheckpointError, match="another backbone"):
        verify(make_checkpoint(vm_dir / "other_backbone.pt", seed=7), onnx=vm_model, settings=two)
    with pytest.raises(IncompatibleCheckpointError, match="both task 't3'"):
        verify([cks[1], cks[1]], onnx=vm_model, settings=two)
    with pytest.raises(BadInputError, match="2 data sets .* for 3 checkpoints"):
        verify(cks, onnx=vm_model, settings=VerifySettings(dataset=["digits", "digits"], limit=2))
    with pytest.raises(BadInputError, match="10 classes, but task 't5'.*--dataset once per --ckpt"):
        verify(cks[:1] + cks[2:], onnx=vm_model, settings=VerifySettings(dataset=["digits", "digits"], limit=2))
    with pytest.raises(BadInputError, match="--per-block compares single-task models"):
        verify(cks, onnx=vm_model, settings=VerifySettings(per_block=True, limit=2))
    single = export_onnx(cks[0], vm_dir / "t10.onnx", ExportSettings(verify=False, simplify=False)).path
    with pytest.raises(BadInputError, match="single-task model and .*tasks.onnx a multi-task one"):
        verify(cks, onnx=[vm_model, single], settings=two)
    with pytest.raises(BadInputError, match="3 checkpoints .* for single-task models"):
        verify(cks, onnx=single, settings=two)
    with pytest.raises(BadInputError, match="2 data sets .* for one checkpoint"):
        verify(cks[0], onnx=single, settings=VerifySettings(dataset=["digits", "digits"], limit=2))


# ------------------------------------------------------------------------------------------ bench


def test_bench_mixed_batches_json(vm_ckpts, vm_model, vm_dir):
    from atexport.benchmark import BENCH_FORMAT, BenchSettings, benchmark

    out = vm_dir / "bench.json"
    from atexport.utils.machine import has_amx

    res = benchmark(list(vm_ckpts.values()), onnx=vm_model, output_json=out,
                    settings=BenchSettings(mixed=True, batches="2,6", runs=3, warmup=1, threads=1, openvino=False))
    doc = json.loads(out.read_text())
    assert doc["format"] == BENCH_FORMAT and doc["config"]["multitask"]["mode"] == "mixed"
    assert doc["config"]["multitask"]["tasks"] == list(CLASSES) and len(doc["config"]["checkpoint"]) == 3
    rows = {(r["backend"], r["batch"]): r for r in doc["rows"]}
    want = {("pytorch", 2), ("pytorch", 6), ("onnxruntime", 2), ("onnxruntime", 6)}
    want |= {("pytorch-bf16", 2), ("pytorch-bf16", 6)} if has_amx() else set()  # BF16 autocast where AMX runs it
    assert set(rows) == want
    for r in doc["rows"]:
        lat = r["latency_ms"]
        assert r["task"] == "mixed" and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["speedup"] == pytest.approx(rows[("pytorch", r["batch"])]["latency_ms"]["mean"] / lat["mean"])
    assert rows[("onnxruntime", 6)]["name"] == "onnxruntime fp32 [mixed, 3 tasks]"
    assert "batch 2 holds fewer samples than the 3 tasks" in doc["notes"][0]
    assert "pytorch eager fp32 [mixed, 3 tasks]" in res.table()


def test_bench_baseline_of_a_mixed_batch_is_each_tasks_model(vm_ckpts, vm_model):
    """The timed PyTorch baseline computes what the multi-task model computes, row by row."""
    from atexport.benchmark import _TasksOneByOne
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.artifact.bank import PAD_LOGIT, mixed_task_ids
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.torch import TorchRunner

    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    ids = mixed_task_ids(7, 3)
    base = _TasksOneByOne([TorchRunner(build_model(load_checkpoint(c))) for c in vm_ckpts.values()], ids, PAD_LOGIT)
    with base, OnnxRuntimeRunner(vm_model) as ort:
        assert np.abs(base.infer(x) - ort.infer(x, task_id=ids)).max() < 1e-5


def test_bench_cli_one_task_and_its_errors(vm_ckpts, vm_model, vm_dir):
    from click.testing import CliRunner

    from atexport.cli import cli

    run = CliRunner()
    t3, t5 = str(vm_ckpts["t3"]), str(vm_ckpts["t5"])
    out = vm_dir / "b1.json"
    common = ["--onnx", str(vm_model), "--batch", "2", "--runs", "2", "--warmup", "0", "--threads", "1"]
    res = run.invoke(cli, ["bench", "--ckpt", t3, *common, "--json", str(out)])  # the task of its one --ckpt
    assert res.exit_code == 0, res.output
    assert "pytorch eager fp32 [t3]" in res.output and "onnxruntime fp32 [t3]" in res.output
    assert {r["task"] for r in json.loads(out.read_text())["rows"]} == {"t3"}
    res = run.invoke(cli, ["bench", "--ckpt", t3, "--ckpt", t5, *common, "--task", "t5"])
    assert res.exit_code == 0 and "onnxruntime fp32 [t5]" in res.output and "[t3]" not in res.output
    for args, needle in (
        (["--ckpt", t3, "--ckpt", t5], "--task NAME (one of ['t3', 't5']) or batches mixing them with --mixed"),
        (["--ckpt", t3, "--task", "t10"], "--task t10: give its checkpoint with --ckpt"),
        (["--ckpt", t3, "--task", "nope"], "no such task; it has ['t10', 't3', 't5']"),
        (["--ckpt", t3, "--ckpt", t5, "--task", "t3", "--mixed"], "choose one"),
        (["--ckpt", t3, "--mixed"], "give the checkpoint of each"),
    ):
        res = run.invoke(cli, ["bench", *args, *common])
        assert res.exit_code == BadInputError.exit_code, res.output
        assert needle in res.output and "Traceback" not in res.output
    res = run.invoke(cli, ["bench", "--ckpt", t3, "--mixed", "--batch", "1"])
    assert res.exit_code == 2 and "--mixed: for multi-task models" in res.output
