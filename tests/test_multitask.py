"""Multi-task models: mixed-task batches equal each task's single-task export (FP32, FP16, INT8),
misfits are refused, and tasks are added, replaced and removed without re-tracing.

Checkpoints of different class counts share one backbone only through a weights file: a random timm
init depends on ``num_classes`` (the head is drawn from the same generator), so ``_helpers.make_checkpoint``
gives every class count its own backbone fingerprint. Here a tiny random backbone is saved once and
every task checkpoint names it as its source, as with a pretrained backbone.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from _helpers import TINY_ARGS, TINY_BACKBONE, make_checkpoint, random_inputs, real_photos

from atexport.errors import BadInputError, IncompatibleCheckpointError
from atexport.artifact.bank import PAD_LOGIT, TASK_AXIS, TASK_INPUT

CLASSES = (5, 3, 7)


def _backbone_file(path):
    import torch

    from atexport.models import ModelSpec, create_backbone

    model = create_backbone(ModelSpec(backbone=TINY_BACKBONE, num_classes=10, model_args=dict(TINY_ARGS)))
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, path)
    return path


def _task_ckpt(path, backbone, num_classes, weight_seed, *, rank=4, every=1, alpha=1.0, regime="adapter"):
    """A checkpoint on the shared backbone file with seeded non-zero adapters and head."""
    import torch

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import Checkpoint, save_checkpoint, trainable_state
    from atexport.models import ModelSpec, backbone_fingerprint, create_backbone, preprocess_config

    spec = ModelSpec(backbone=TINY_BACKBONE, num_classes=num_classes, model_args=dict(TINY_ARGS),
                     source={"kind": "file", "path": str(backbone)},
                     class_names=[f"{path.stem}_{i}" for i in range(num_classes)])
    model = create_backbone(spec)
    fp = backbone_fingerprint(model)
    cfg = AdapterConfig(rank=rank, every=every, alpha=alpha) if regime == "adapter" else None
    if cfg:
        inject_adapters(model, cfg)
    g = torch.Generator().manual_seed(weight_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name or name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ck = Checkpoint(model=spec, adapter=cfg, regime=regime, fingerprint=fp, state_dict=trainable_state(model, regime),
                    preprocess=preprocess_config(model))
    return save_checkpoint(ck, path)


@pytest.fixture(scope="session")
def mt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("multitask")


@pytest.fixture(scope="session")
def backbone(mt_dir):
    return _backbone_file(mt_dir / "backbone.pt")


@pytest.fixture(scope="session")
def ckpts(mt_dir, backbone):
    return [_task_ckpt(mt_dir / f"task{i}.pt", backbone, c, weight_seed=10 + i) for i, c in enumerate(CLASSES)]


@pytest.fixture(scope="session")
def extra_ckpts(mt_dir, backbone):
    """A fourth task (4 classes), a new version of task1, and a head too wide for the model (9 > 7)."""
    return {
        "new": _task_ckpt(mt_dir / "task3.pt", backbone, 4, weight_seed=20),
        "task1_v2": _task_ckpt(mt_dir / "task1_v2.pt", backbone, 3, weight_seed=21),
        "wide": _task_ckpt(mt_dir / "wide.pt", backbone, 9, weight_seed=22),
    }


@pytest.fixture(scope="session")
def mt(mt_dir, ckpts):
    """The multi-task export of the three tasks (with its own parity check against PyTorch)."""
    from atexport.export.multitask import export_multitask

    return export_multitask(ckpts, mt_dir / "tasks.onnx")


@pytest.fixture(scope="session")
def singles(mt_dir, ckpts):
    """Each task's own single-task export (the reference every multi-task row must equal)."""
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return [export_onnx(ck, mt_dir / f"single{i}.onnx", ExportSettings(verify=False)).path
            for i, ck in enumerate(ckpts)]


@pytest.fixture(scope="session")
def inputs(mt):
    from atexport.runtime.preprocess import Preprocessor

    photos = Preprocessor(mt.metadata.preprocess)(real_photos())
    return np.concatenate([photos, random_inputs(5, seed=4)])


@pytest.fixture(scope="session")
def task_ids(inputs):
    """Interleaved and unsorted: 0 1 2 2 0 1 1 2 0 ..."""
    pattern = np.array([0, 1, 2, 2, 0, 1, 1, 2, 0])
    return np.resize(pattern, len(inputs)).astype(np.int64)


@pytest.fixture(scope="session")
def single_logits(singles, inputs):
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    out = []
    for path in singles:
        with OnnxRuntimeRunner(path) as r:
            out.append(r.infer(inputs))
    return out


def _mixed(model, x, ids, batch):
    from atexport.runtime.batching import run_batched
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(model) as r:
        return run_batched(r, x, batch, per_sample={TASK_INPUT: ids})


def _rows(y, ids, task, classes):
    return y[ids == task][:, :classes]


# ------------------------------------------------------------------------------------------ FP32


@pytest.mark.parametrize("batch", [1, 5])
def test_mixed_batch_equals_single_task_exports(mt, inputs, task_ids, single_logits, batch):
    y = _mixed(mt.path, inputs, task_ids, batch)
    assert y.shape == (len(inputs), max(CLASSES))
    for k, c in enumerate(CLASSES):
        ref = single_logits[k][task_ids == k]
        assert np.abs(_rows(y, task_ids, k, c) - ref).max() <= 1e-5  # float32 rounding
        assert np.all(y[task_ids == k][:, c:] == np.float32(PAD_LOGIT))  # padding exact and finite


def test_export_verified_each_task_against_pytorch(mt):
    assert mt.passed and mt.parity
    assert {r.name.split()[0] for r in mt.parity} == {"task0", "task1", "task2"}
    assert max(r.max_abs for r in mt.parity) < 1e-5


def test_metadata_contract(mt, ckpts):
    from atexport.checkpoint import load_checkpoint
    from atexport.artifact.bank import task_fingerprint
    from atexport.artifact.onnx import check_manifest
    from atexport.artifact.metadata import read_onnx_metadata

    proto = onnx.load(str(mt.path))
    meta = read_onnx_metadata(proto)
    assert [t["name"] for t in meta.tasks] == ["task0", "task1", "task2"]
    assert [t["index"] for t in meta.tasks] == [0, 1, 2]
    assert [t["num_classes"] for t in meta.tasks] == list(CLASSES)
    assert [t["source"] for t in meta.tasks] == [p.name for p in ckpts]
    assert meta.tasks[2]["class_names"] == [f"task2_{i}" for i in range(7)]
    assert meta.tasks[0]["fingerprint"] == task_fingerprint(load_checkpoint(ckpts[0]).state_dict)
    assert meta.input["name"] == "input" and meta.input["shape"] == ["batch", 3, 32, 32]
    assert meta.extra["task_input"]["name"] == TASK_INPUT and meta.extra["task_input"]["dtype"] == "int64"
    assert meta.output == {"name": "logits", "shape": ["batch", 7], "dtype": "float32", "padded": True,
                           "pad_value": PAD_LOGIT}
    assert meta.separable and meta.num_classes is None and meta.adapter["rank"] == 4
    # the manifest: 4 tensors per block + head weight and bias, task axis first, true to the graph
    assert len(meta.manifest) == 4 * TINY_ARGS["depth"] + 2
    assert meta.manifest["bank.head.weight"]["shape"] == [3, 64, 7]
    assert meta.manifest["bank.blocks.0.adapter.down.weight"]["bank"]["source"] == "blocks.0.adapter.down.weight"
    check_manifest(proto, meta.manifest)
    # ORT sees two inputs; the bank inputs have the symbolic task axis and feed only Gather nodes
    ins = {i.name: i for i in proto.graph.input}
    assert ins["bank.head.bias"].type.tensor_type.shape.dim[0].dim_param == TASK_AXIS
    users = [n.op_type for n in proto.graph.node for i in n.input if i in meta.manifest]
    assert set(users) == {"Gather"} and len(users) == len(meta.manifest)
    from atexport.runtime.onnxruntime import create_session

    s = create_session(mt.path)
    assert [(i.name, i.type) for i in s.get_inputs()] == [("input", "tensor(float)"), (TASK_INPUT, "tensor(int64)")]


def test_task_slice_is_torch_free_and_pads():
    from atexport.artifact.bank import bank_layout, bank_manifest, task_slice

    man = bank_manifest(bank_layout(dim=4, rank=2, placed=[0], max_classes=5), tasks=1)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)  # head.weight of a 3-class task [C, D]
    s = task_slice(man["bank.head.weight"], w)
    assert s.shape == (4, 5) and np.array_equal(s[:, :3], w.T) and not s[:, 3:].any()
    b = task_slice(man["bank.head.bias"], np.ones(3, np.float32))
    assert b.tolist() == [1, 1, 1, PAD_LOGIT, PAD_LOGIT]
    with pytest.raises(IncompatibleCheckpointError, match="at most 5 classes"):
        task_slice(man["bank.head.bias"], np.ones(6, np.float32))


# ------------------------------------------------------------------------------------ FP16 / INT8


@pytest.fixture(scope="session")
def precision_models(mt, mt_dir):
    from atexport.export.precision import convert_precision, Int8Options

    return {
        "fp16": convert_precision(mt.path, "fp16", mt_dir / "tasks.fp16.onnx"),
        "int8": convert_precision(mt.path, "int8", mt_dir / "tasks.int8.onnx",
                                  int8=Int8Options(calib="digits", count=64)),
    }


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precision_models_mixed_batch_against_single_task(precision, precision_models, inputs, task_ids,
                                                          single_logits):
    from atexport.artifact.onnx import check_manifest
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.parity.compare import compare, load_tolerances

    res = precision_models[precision]
    assert res.passed and {r.name.split()[1] for r in res.parity} == {"task0", "task1", "task2"}  # per-task verify
    proto = onnx.load(str(res.path))
    meta = read_onnx_metadata(proto)
    check_manifest(proto, meta.manifest)  # the bank is still FP32 overridable initializers
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in proto.graph.initializer if i.name in meta.manifest)
    tol = load_tolerances()[precision]
    y = _mixed(res.path, inputs, task_ids, 5)
    for k, c in enumerate(CLASSES):
        row = compare(single_logits[k][task_ids == k], _rows(y, task_ids, k, c), tol, name=f"task{k}")
        assert row.passed, row.failures
        assert row.top1_agreement >= tol.min_top1_agreement
        assert np.all(y[task_ids == k][:, c:] == np.float32(PAD_LOGIT))


# ------------------------------------------------------------------------------------------ refusals


def test_refuses_checkpoints_that_cannot_share_a_model(mt_dir, backbone, ckpts):
    from atexport.export.multitask import export_multitask
    from atexport.export.settings import ExportSettings

    other_backbone = make_checkpoint(mt_dir / "other_backbone.pt", num_classes=5, seed=7)
    rank8 = _task_ckpt(mt_dir / "rank8.pt", backbone, 5, 1, rank=8)
    every2 = _task_ckpt(mt_dir / "every2.pt", backbone, 5, 1, every=2)
    alpha2 = _task_ckpt(mt_dir / "alpha2.pt", backbone, 5, 1, alpha=2.0)
    head = _task_ckpt(mt_dir / "head.pt", backbone, 5, 1, regime="head")
    cases = [
        (other_backbone, "other_backbone.pt: backbone fingerprint"),
        (rank8, r"rank8.pt: adapter rank 8 != task0.pt's 4"),
        (every2, r"every2.pt: adapter placement every=2 != task0.pt's 1"),
        (alpha2, "alpha2.pt: adapter scale alpha=2.0 != task0.pt's 1.0"),
        (head, "head.pt: regime 'head' != task0.pt's 'adapter'"),
    ]
    for bad, msg in cases:
        with pytest.raises(IncompatibleCheckpointError, match=msg):
            export_multitask([ckpts[0], bad], mt_dir / "never.onnx", ExportSettings(verify=False))
    assert not (mt_dir / "never.onnx").exists()
    with pytest.raises(BadInputError, match="used twice"):
        export_multitask([ckpts[0], ckpts[1]], mt_dir / "never.onnx", task_names=["a", "a"])
    with pytest.raises(BadInputError, match="--max-classes 5"):
        export_multitask(ckpts, mt_dir / "never.onnx", max_classes=5)


def test_head_only_tasks(mt_dir, backbone):
    """Head-only checkpoints share a model too (a bank of heads, no adapters)."""
    from atexport.export.multitask import export_multitask
    from atexport.export.settings import ExportSettings

    a = _task_ckpt(mt_dir / "head_a.pt", backbone, 2, 1, regime="head")
    b = _task_ckpt(mt_dir / "head_b.pt", backbone, 6, 2, regime="head")
    res = export_multitask([a, b], mt_dir / "heads.onnx", ExportSettings(simplify=False))
    assert res.passed and list(res.metadata.manifest) == ["bank.head.weight", "bank.head.bias"]


# ----------------------------------------------------------------------- add / replace / remove


def test_add_replace_remove_round_trip(mt, mt_dir, inputs, task_ids, single_logits, extra_ckpts):
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.export.multitask import add_task, list_tasks, remove_task

    model = mt_dir / "edit.onnx"
    shutil.copy(mt.path, model)
    before = _mixed(model, inputs, task_ids, 5)

    r = add_task(model, extra_ckpts["new"], name="new")  # in place
    assert r.path == model and r.unchanged_max_abs == 0.0
    assert [(t["name"], t["index"], t["num_classes"]) for t in list_tasks(model)][-1] == ("new", 3, 4)
    ids4 = np.resize(np.array([3, 0, 1, 2]), len(inputs)).astype(np.int64)
    y = _mixed(model, inputs, ids4, 4)
    assert np.array_equal(_mixed(model, inputs, task_ids, 5), before)  # untouched tasks: bit-identical
    for k, c in enumerate(CLASSES):
        assert np.abs(_rows(y, ids4, k, c) - single_logits[k][ids4 == k]).max() <= 1e-5
    torch_new = build_model(load_checkpoint(extra_ckpts["new"]))
    import torch

    with torch.no_grad():
        ref = torch_new(torch.from_numpy(inputs[ids4 == 3])).numpy()
    assert np.abs(_rows(y, ids4, 3, 4) - ref).max() <= 1e-5
    assert np.all(y[ids4 == 3][:, 4:] == np.float32(PAD_LOGIT))

    with pytest.raises(BadInputError, match="already has a task 'new'"):
        add_task(model, extra_ckpts["new"], name="new")
    with pytest.raises(IncompatibleCheckpointError, match="9 classes > the model's capacity of 7"):
        add_task(model, extra_ckpts["wide"])

    # replace task1: its rows change, the others stay, indices stay
    r = add_task(model, extra_ckpts["task1_v2"], name="task1", replace=True, output=mt_dir / "edit_v2.onnx")
    assert [t["name"] for t in r.metadata.tasks] == ["task0", "task1", "task2", "new"]
    assert r.metadata.tasks[1]["source"] == "task1_v2.pt"
    y2 = _mixed(r.path, inputs, ids4, 4)
    assert np.abs(y2[ids4 != 1] - y[ids4 != 1]).max() == 0.0
    assert np.abs(_rows(y2, ids4, 1, 3) - _rows(y, ids4, 1, 3)).max() > 1e-3

    # remove task0: the others move down one index and keep their logits
    r = remove_task(r.path, "task0", output=mt_dir / "edit_rm.onnx")
    assert [(t["name"], t["index"]) for t in r.metadata.tasks] == [("task1", 0), ("task2", 1), ("new", 2)]
    proto = onnx.load(str(r.path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 32, 32]
    from atexport.artifact.onnx import check_manifest

    check_manifest(proto, r.metadata.manifest)
    assert r.metadata.manifest["bank.head.weight"]["shape"] == [3, 64, 7]
    y3 = _mixed(r.path, inputs, np.where(ids4 > 0, ids4 - 1, 0), 4)
    assert np.abs(y3[ids4 > 0] - y2[ids4 > 0]).max() == 0.0

    for name in ("task1", "task2"):
        remove_task(r.path, name)
    assert [t["name"] for t in list_tasks(r.path)] == ["new"]
    with pytest.raises(BadInputError, match="only task"):
        remove_task(r.path, "new")
    with pytest.raises(BadInputError, match="no task 'nope'"):
        remove_task(mt.path, "nope", output=mt_dir / "x.onnx")


def test_editing_refuses_int8_and_single_task_models(precision_models, singles, extra_ckpts, mt_dir):
    from atexport.export.multitask import add_task, remove_task

    with pytest.raises(BadInputError, match="INT8 model"):
        add_task(precision_models["int8"].path, extra_ckpts["new"], output=mt_dir / "x.onnx")
    with pytest.raises(BadInputError, match="single-task model"):
        remove_task(singles[0], "task0", output=mt_dir / "x.onnx")


def test_swap_points_multitask_models_to_atexport_tasks(mt, extra_ckpts, mt_dir):
    from atexport.errors import IncompatibleCheckpointError
    from atexport.export.swap import swap_onnx

    with pytest.raises(IncompatibleCheckpointError, match="multi-task model .*atexport tasks add"):
        swap_onnx(mt.path, extra_ckpts["new"], mt_dir / "swapped.onnx")


def test_fp16_model_accepts_a_new_task(precision_models, mt_dir, extra_ckpts, inputs):
    from atexport.export.multitask import add_task

    r = add_task(precision_models["fp16"].path, extra_ckpts["new"], output=mt_dir / "fp16_plus.onnx")
    assert r.metadata.precision == "fp16" and len(r.metadata.tasks) == 4
    y = _mixed(r.path, inputs, np.full(len(inputs), 3, np.int64), 4)
    assert np.isfinite(y).all() and np.all(y[:, 4:] == np.float32(PAD_LOGIT))


# ------------------------------------------------------------------------------- concurrent edits


def test_an_edit_that_loses_a_race_fails_clearly(mt, mt_dir, extra_ckpts, monkeypatch):
    """Another edit lands while this one runs: this one fails with exit 2's error, the other's task stays."""
    from atexport.export.multitask import add_task, edit, list_tasks
    from atexport.export.multitask.lock import lock_path

    model = mt_dir / "race_inproc.onnx"
    shutil.copy(mt.path, model)
    real_probe, raced = edit._probe, []

    def probe_after_another_edit(*args, **kwargs):
        if not raced:  # the first probe of the outer edit: a real, complete edit of the same file lands now
            raced.append("other")
            add_task(model, extra_ckpts["task1_v2"], name="other")
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(edit, "_probe", probe_after_another_edit)
    with pytest.raises(BadInputError, match=r"race_inproc.onnx changed while this edit ran \(another 'atexport "
                       r"tasks' edit\?\); run the command again"):
        add_task(model, extra_ckpts["new"], name="new")
    assert [t["name"] for t in list_tasks(model)] == ["task0", "task1", "task2", "other"]
    assert not lock_path(model).exists()
    # a separate output is no in-place edit: it is written even though the source changed meanwhile
    raced.clear()
    shutil.copy(mt.path, model)
    r = add_task(model, extra_ckpts["new"], mt_dir / "race_out.onnx", name="new")
    assert [t["name"] for t in r.metadata.tasks][-1] == "new"


@pytest.mark.parametrize("age_s, wait_s, held", [(0, 0.3, True), (11 * 60, 0.3, False)])
def test_lock_file_waits_for_a_live_edit_and_takes_over_a_stale_one(tmp_path, age_s, wait_s, held):
    import os
    import time

    from atexport.export.multitask.lock import exclusive_lock, lock_path

    target = tmp_path / "m.onnx"
    lock = lock_path(target)
    assert lock.name == "m.onnx.lock"
    lock.write_text(json.dumps({"pid": 123, "host": "elsewhere", "time": "then"}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    if held:
        t0 = time.monotonic()
        with pytest.raises(BadInputError, match=r"m.onnx.lock is held by pid 123 on elsewhere .*delete"):
            with exclusive_lock(target, "--model m.onnx", wait_s=wait_s):
                pass
        assert time.monotonic() - t0 >= wait_s and lock.exists()  # someone else's lock is left alone
    else:
        with exclusive_lock(target, "--model m.onnx", wait_s=wait_s):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()


def test_two_cli_edits_at_once_never_lose_a_task(mt, mt_dir, backbone):
    """Two real 'atexport tasks add' processes on one model: both tasks end up in it, or the loser exits 2."""
    import subprocess
    import sys

    from atexport.export.multitask import list_tasks
    from atexport.export.multitask.lock import lock_path

    model = mt_dir / "race_cli.onnx"
    shutil.copy(mt.path, model)
    runs = {}
    for name, seed in (("cars", 30), ("birds", 31)):
        (mt_dir / "runs" / name).mkdir(parents=True, exist_ok=True)
        runs[name] = _task_ckpt(mt_dir / "runs" / name / "run.pt", backbone, 3, weight_seed=seed)

    def add(name):
        return subprocess.Popen([sys.executable, "-m", "atexport", "tasks", "add", "--model", str(model), "--ckpt",
                                 str(runs[name])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {name: add(name) for name in runs}  # default names from the run folders: cars, birds
    done = {name: (p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for name, p in procs.items()}
    won = sorted(n for n, (rc, _) in done.items() if rc == 0)
    for name, (rc, out) in done.items():
        assert rc in (0, 2), out
        if rc == 2:
            assert "race_cli.onnx changed while this edit ran" in out and "run the command again" in out, out
            assert "wrote" not in out and "Traceback" not in out
    assert won, done  # one edit always wins
    assert {t["name"] for t in list_tasks(model)} == {"task0", "task1", "task2", *won}
    assert not lock_path(model).exists()
    for name in sorted(set(runs) - set(won)):  # the loser runs again, as told
        rc = add(name).wait(timeout=600)
        assert rc == 0
    assert [t["name"] for t in list_tasks(model)][3:] in (["cars", "birds"], ["birds", "cars"])


# ------------------------------------------------------------------------------------------ CLI


def test_cli(mt, mt_dir, backbone, ckpts, extra_ckpts):
    from click.testing import CliRunner

    from atexport.cli import cli

    rank8 = _task_ckpt(mt_dir / "cli_rank8.pt", backbone, 5, 1, rank=8)

    run = CliRunner()
    res = run.invoke(cli, ["onnx", "--ckpt", str(ckpts[0]), "--ckpt", str(ckpts[1]), "-o", str(mt_dir / "no.onnx")])
    assert res.exit_code == 2 and "--multitask" in res.output and "Traceback" not in res.output

    out = mt_dir / "cli_tasks.onnx"
    res = run.invoke(cli, ["onnx", "--ckpt", str(ckpts[0]), "--ckpt", str(ckpts[2]), "--multitask", "--task-name", "a",
                           "--task-name", "b", "--max-classes", "10", "--no-verify", "--no-simplify", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 tasks" in res.output and "logits batchx10" in res.output

    res = run.invoke(cli, ["tasks", "list", "--model", str(out)])
    assert res.exit_code == 0 and "a" in res.output and "task2.pt" in res.output
    res = run.invoke(cli, ["tasks", "add", "--model", str(out), "--ckpt", str(extra_ckpts["wide"])])
    assert res.exit_code == 0, res.output  # 9 classes fit the capacity of 10
    assert "added task 'wide' (index 2, 9 classes)" in res.output
    res = run.invoke(cli, ["tasks", "remove", "--model", str(out), "--name", "a"])
    assert res.exit_code == 0 and "0:b, 1:wide" in res.output
    res = run.invoke(cli, ["tasks", "list", "--model", str(out), "--json"])
    assert [t["name"] for t in json.loads(res.output)] == ["b", "wide"]
    run.invoke(cli, ["tasks", "remove", "--model", str(out), "--name", "b"])
    res = run.invoke(cli, ["tasks", "remove", "--model", str(out), "--name", "wide"])
    assert res.exit_code == 2 and "only task" in res.output and "Traceback" not in res.output
    res = run.invoke(cli, ["tasks", "add", "--model", str(mt.path), "--ckpt", str(rank8),
                           "-o", str(mt_dir / "x.onnx")])
    assert res.exit_code == 3 and "adapter rank 8 != the model's 4" in res.output
