"""The torch-free runtime: preprocessing equals timm's, predictions equal PyTorch's, torch is never imported.

Tiny 32-px ViT checkpoints (tests/_helpers.py) exported once per session; real photos from scikit-image
in several sizes and modes; a hand-built multi-task ONNX model (task_id input, padded logits).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _helpers import real_photos

from atexport.errors import BadInputError, IncompatibleCheckpointError, MissingDependencyError

PREPROCESS_CASES = [
    dict(input_size=[3, 32, 32], interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3, crop_pct=0.9, crop_mode="center"),
    dict(input_size=[3, 224, 224], interpolation="bicubic", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
         crop_pct=0.875, crop_mode="center"),
    dict(input_size=[3, 64, 48], interpolation="bilinear", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
         crop_pct=0.95, crop_mode="center"),
    dict(input_size=[3, 96, 96], interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, crop_mode="squash"),
    dict(input_size=[3, 80, 64], interpolation="bicubic", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
         crop_pct=0.9, crop_mode="border"),
]


@pytest.fixture(scope="session")
def photos():
    return real_photos()


@pytest.fixture(scope="session")
def runtime_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="session")
def sep_onnx(tiny_ckpt, runtime_dir):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    return export_onnx(tiny_ckpt, runtime_dir / "tiny.onnx", ExportSettings(separable=True, verify=False)).path


@pytest.fixture(scope="session")
def photo_files(photos, runtime_dir):
    """Real photos on disk in several formats and modes (what open_image reads)."""
    folder = runtime_dir / "photos"
    folder.mkdir(exist_ok=True)
    files = []
    for i, img in enumerate(photos[:4]):
        p = folder / f"rgb{i}.jpg"
        img.convert("RGB").save(p, quality=92)
        files.append(p)
    for mode, suffix in (("L", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "bmp")):
        p = folder / f"{mode.lower()}.{suffix}"
        photos[4].convert(mode).save(p)
        files.append(p)
    return files


def torch_logits(ckpt_path, images) -> np.ndarray:
    """The PyTorch model of a checkpoint on timm's own eval transform."""
    import torch

    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.data import eval_transform

    ck = load_checkpoint(ckpt_path)
    tf = eval_transform(ck.preprocess)
    x = torch.stack([tf(im.convert("RGB")) for im in images])
    with torch.inference_mode():
        return build_model(ck)(x).numpy()


def build_multitask_onnx(path: Path) -> dict:
    """A hand-built multi-task model: logits[i] = mean_rgb(x_i) @ W[task_id_i] + b[task_id_i], padded to 5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from atexport.artifact.metadata import ModelMetadata, write_onnx_metadata

    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 3, 5)).astype(np.float32)
    b = rng.standard_normal((2, 5)).astype(np.float32)
    b[0, 3:] = -1e4  # task 0 has 3 classes: its padding columns must never win
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["feat"], keepdims=0),
        helper.make_node("Unsqueeze", ["feat", "one"], ["feat3"]),
        helper.make_node("Gather", ["W", "task_id"], ["w_t"], axis=0),
        helper.make_node("MatMul", ["feat3", "w_t"], ["mm"]),
        helper.make_node("Squeeze", ["mm", "one"], ["mm2"]),
        helper.make_node("Gather", ["B", "task_id"], ["b_t"], axis=0),
        helper.make_node("Add", ["mm2", "b_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "multitask",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32]),
         helper.make_tensor_value_info("task_id", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"),
         numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(np.array([1], np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    meta = ModelMetadata(
        backbone={"name": "toy", "fingerprint": "0" * 64}, input={"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"},
        output={"name": "logits", "shape": ["batch", 5]}, preprocess=PREPROCESS_CASES[0],
        tasks=[{"name": "birds", "index": 0, "num_classes": 3, "class_names": ["sparrow", "owl", "heron"]},
               {"name": "cars", "index": 1, "num_classes": 5, "class_names": ["a", "b", "c", "d", "e"]}],
    )
    write_onnx_metadata(model, meta)
    onnx.save(model, str(path))
    return {"W": w, "B": b}


def fake_engine(folder: Path, meta_dict: dict) -> Path:
    """An engine file with a valid sidecar (what 'atexport trt' writes beside an engine)."""
    engine = folder / "fake.engine"
    engine.write_bytes(b"not a real engine, but its sidecar matches it")
    sidecar = {
        "format": "atexport.engine", "format_version": 1, "precision": "fp16",
        "tensorrt": {"version": "10.9.0", "major": 10}, "device": {"name": "NVIDIA Jetson Orin", "compute_capability": [8, 7]},
        "profiles": [{"input": "input", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}],
        "engine": {"path": engine.name, "sha256": hashlib.sha256(engine.read_bytes()).hexdigest()},
        "metadata": meta_dict,
    }
    (folder / "fake.engine.json").write_text(json.dumps(sidecar))
    return engine


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("config", PREPROCESS_CASES, ids=lambda c: f"{c['crop_mode']}-{c['input_size'][1]}x{c['input_size'][2]}")
def test_preprocessing_equals_timm_eval_transform(config, photos):
    """Several sizes (191..1000 px), aspect ratios and modes (RGB, L, RGBA, P) against timm's transform."""
    from atexport.data import eval_transform
    from atexport.runtime import Preprocessor

    ours = Preprocessor(config)(photos)
    tf = eval_transform(config)
    theirs = np.stack([tf(im.convert("RGB")).numpy() for im in photos])
    assert ours.shape == theirs.shape == (len(photos), *config["input_size"])
    assert {im.mode for im in photos} >= {"RGB", "L", "RGBA", "P"}
    assert float(np.abs(ours - theirs).max()) <= 1e-5


# ------------------------------------------------------------------------------------------ predictions


def test_predictions_equal_pytorch(sep_onnx, tiny_ckpt, photos):
    from atexport.runtime import load_model

    ref = torch_logits(tiny_ckpt, photos)
    with load_model(sep_onnx) as model:
        assert model.mode == "separable" and model.class_names == [f"class_{i}" for i in range(5)]
        got = model.logits(photos)
        preds = model.predict(photos, top_k=3)
        # a preprocessed batch and a single image go through the same path
        np.testing.assert_allclose(model.logits(model.preprocess(photos)), got, atol=1e-6)
        single = model.predict(photos[0], top_k=1)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert [p.index for p in preds] == ref.argmax(1).tolist()
    p = preds[0]
    probs = np.exp(ref[0] - ref[0].max()) / np.exp(ref[0] - ref[0].max()).sum()
    assert p.label == f"class_{ref[0].argmax()}" and abs(p.score - probs.max()) < 1e-4
    assert len(p.topk) == 3 and [t[2] for t in p.topk] == sorted((t[2] for t in p.topk), reverse=True)
    assert single[0].index == p.index and len(single[0].topk) == 1


def test_runtime_never_imports_torch(sep_onnx, tiny_ckpt, tiny_ckpt_b, photo_files, runtime_dir, photos):
    """import atexport.runtime; load_model(...).predict(...), task switch from an .npz, multi-task: no torch."""
    from atexport.checkpoint import export_task_weights

    npz = export_task_weights(tiny_ckpt_b, runtime_dir / "task_b.npz", name="task_b")
    mt = runtime_dir / "multitask.onnx"
    build_multitask_onnx(mt)
    script = textwrap.dedent(f"""
        import json, sys
        import atexport.runtime
        from atexport.runtime import load_model
        files = {[str(p) for p in photo_files]!r}
        m = load_model({str(sep_onnx)!r})
        a = [p.index for p in m.predict(files)]
        m.set_task({str(npz)!r})
        b = [p.index for p in m.predict(files)]
        mixed = [p.task for p in m.predict(files[:3], task=["task_b", "tiny_a", None])]
        mt = load_model({str(mt)!r})
        tasks = [(p.task, p.label) for p in mt.predict(files[:2], task=["birds", "cars"])]
        print(json.dumps({{"a": a, "b": b, "mixed": mixed, "mt": tasks, "logits": m.logits(files).tolist(),
                          "torch": "torch" in sys.modules, "timm": "timm" in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] is False and res["timm"] is False
    from PIL import Image

    imgs = [Image.open(p) for p in photo_files]
    ref_a, ref_b = torch_logits(tiny_ckpt, imgs), torch_logits(tiny_ckpt_b, imgs)
    assert res["a"] == ref_a.argmax(1).tolist()
    assert res["b"] == ref_b.argmax(1).tolist()
    assert res["a"] != res["b"]  # the task switch changed something
    np.testing.assert_allclose(np.array(res["logits"]), ref_b, atol=1e-4, rtol=1e-4)
    assert res["mixed"] == ["task_b", "tiny_a", "task_b"]  # None: the selected task
    assert [t for t, _ in res["mt"]] == ["birds", "cars"] and res["mt"][0][1] in ("sparrow", "owl", "heron")


# ------------------------------------------------------------------------------------------ tasks


def test_separable_task_switching(sep_onnx, tiny_ckpt, tiny_ckpt_b, photos, runtime_dir):
    from atexport.runtime import load_model
    from atexport.artifact.tasks import load_task
    from atexport.checkpoint import export_task_weights

    npz = export_task_weights(tiny_ckpt_b, runtime_dir / "b.npz")
    task = load_task(npz)
    assert task.name == "tiny_b"  # recorded from the checkpoint and task.info["backbone"]["fingerprint"] and task.class_names == [f"class_{i}" for i in range(5)]
    ref_a, ref_b = torch_logits(tiny_ckpt, photos), torch_logits(tiny_ckpt_b, photos)
    with load_model(sep_onnx, task=npz) as model:
        assert model.task == "tiny_b" and model.tasks == ["tiny_a", "tiny_b"]
        np.testing.assert_allclose(model.logits(photos), ref_b, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(model.logits(photos, task="tiny_a"), ref_a, atol=1e-4, rtol=1e-4)
        # one task per image: each row is its own task's
        tasks = ["tiny_b" if i % 2 else "tiny_a" for i in range(len(photos))]
        mixed = model.logits(photos, task=tasks)
        want = np.where(np.array([t == "tiny_b" for t in tasks])[:, None], ref_b, ref_a)
        np.testing.assert_allclose(mixed, want, atol=1e-4, rtol=1e-4)
        assert [p.task for p in model.predict(photos, task=tasks)] == tasks
        # a loaded checkpoint works too (where torch is installed), under another name
        from atexport.checkpoint import load_checkpoint

        model.add_task(load_checkpoint(tiny_ckpt), name="a_again")
        np.testing.assert_allclose(model.logits(photos, task="a_again"), ref_a, atol=1e-4, rtol=1e-4)
        with pytest.raises(BadInputError, match="no task 'nope'"):
            model.predict(photos, task="nope")
        with pytest.raises(BadInputError, match="one per image"):
            model.predict(photos, task=["tiny_b"])


def test_separable_model_opens_one_session_and_checks_a_task_once(sep_onnx, tiny_ckpt_b, runtime_dir, monkeypatch):
    import atexport.runtime.onnxruntime as ort_mod
    import atexport.runtime.session as session_mod
    from atexport.checkpoint import export_task_weights
    from atexport.runtime import load_model
    from atexport.runtime.session import AdapterSession

    npz = export_task_weights(tiny_ckpt_b, runtime_dir / "once.npz")
    sessions, checks = [], []
    real_session, real_check = ort_mod.create_session, session_mod.check_fits
    monkeypatch.setattr(ort_mod, "create_session", lambda *a, **k: sessions.append(a) or real_session(*a, **k))
    counting = lambda *a, **k: checks.append(a) or real_check(*a, **k)  # noqa: E731
    monkeypatch.setattr(session_mod, "check_fits", counting)
    monkeypatch.setattr("atexport.artifact.fit.check_fits", counting)
    with load_model(sep_onnx) as model:
        assert isinstance(model.runner, AdapterSession) and len(sessions) == 1
        model.add_task(npz)
        assert len(checks) == 1 and model.tasks == ["tiny_a", "tiny_b"]
    assert len(sessions) == 1


def test_task_that_does_not_fit_is_refused(sep_onnx, tiny_ckpt, tiny_ckpt_every2, runtime_dir):
    from atexport.runtime import load_model
    from atexport.artifact.tasks import load_task
    from atexport.checkpoint import export_task_weights

    npz = export_task_weights(tiny_ckpt_every2, runtime_dir / "every2.npz")
    with load_model(sep_onnx) as model:
        with pytest.raises(IncompatibleCheckpointError, match="every=2"):
            model.set_task(npz)
        other = load_task(npz)
        other.info["backbone"]["fingerprint"] = "f" * 64
        with pytest.raises(IncompatibleCheckpointError, match="fingerprint"):
            model.add_task(other)
        bad = dict(load_task(export_task_weights(tiny_ckpt, runtime_dir / "a.npz")).arrays)
        bad["head.weight"] = np.zeros((2, 2), np.float32)
        with pytest.raises(IncompatibleCheckpointError, match="shape"):
            model.add_task(bad, name="broken")
    with pytest.raises(BadInputError, match="not a readable task-weights"):
        (runtime_dir / "junk.npz").write_bytes(b"junk")
        load_task(runtime_dir / "junk.npz")


def test_single_task_model_refuses_tasks(sep_onnx, runtime_dir, tiny_ckpt_b):
    """A model with fused weights (metadata: not separable) says how to serve other tasks."""
    import onnx

    from atexport.artifact.metadata import read_onnx_metadata, write_onnx_metadata
    from atexport.runtime import load_model
    from atexport.checkpoint import export_task_weights

    proto = onnx.load(str(sep_onnx))
    meta = read_onnx_metadata(proto)
    meta.separable, meta.manifest = False, {}
    write_onnx_metadata(proto, meta)
    fused = runtime_dir / "fused_like.onnx"
    onnx.save(proto, str(fused))
    with load_model(fused) as model:
        assert model.mode == "single" and model.tasks == ["tiny_a"]
        assert len(model.predict(np.zeros((2, 3, 32, 32), np.float32), task="tiny_a")) == 2
        with pytest.raises(IncompatibleCheckpointError, match="--separable"):
            model.set_task(export_task_weights(tiny_ckpt_b, runtime_dir / "b2.npz"))
        with pytest.raises(BadInputError, match="serves one task"):
            model.set_task("other")


def test_multitask_model_slices_rows_per_task(runtime_dir):
    from atexport.runtime import load_model

    path = runtime_dir / "mt.onnx"
    wb = build_multitask_onnx(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    feat = x.mean(axis=(2, 3))
    with load_model(path) as model:
        assert model.mode == "multitask" and model.tasks == ["birds", "cars"]
        with pytest.raises(BadInputError, match="multi-task model serving"):
            model.predict(x)
        birds = model.logits(x, task="birds")
        assert birds.shape == (4, 3)
        np.testing.assert_allclose(birds, feat @ wb["W"][0][:, :3] + wb["B"][0][:3], atol=1e-5)
        tasks = ["cars", "birds", "cars", "birds"]
        preds = model.predict(x, task=tasks, top_k=5)
        for i, (p, t) in enumerate(zip(preds, tasks)):
            k = 0 if t == "birds" else 1
            row = feat[i] @ wb["W"][k] + wb["B"][k]
            n = 3 if t == "birds" else 5
            assert p.task == t and p.index == int(row[:n].argmax()) and len(p.topk) == n
            assert p.label == (["sparrow", "owl", "heron"] if t == "birds" else list("abcde"))[p.index]
        padded = model.logits(x, task=tasks)
        assert padded.shape == (4, 5) and np.isinf(padded[1, 3:]).all() and np.isfinite(padded[0]).all()
        model.set_task("cars")
        assert model.class_names == list("abcde") and len(model.predict(x[:1])[0].topk) == 5
        with pytest.raises(BadInputError, match="no task 'planes'"):
            model.set_task("planes")


def test_engine_without_tensorrt_is_one_clear_error(sep_onnx, runtime_dir):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    from click.testing import CliRunner

    from atexport.cli import cli
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.runtime import load_model
    import onnx
    from dataclasses import asdict

    engine = fake_engine(runtime_dir, asdict(read_onnx_metadata(onnx.load(str(sep_onnx)))))
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        load_model(engine)
    res = CliRunner().invoke(cli, ["predict", "--model", str(engine), str(sep_onnx)])
    assert res.exit_code == MissingDependencyError.exit_code and "Traceback" not in res.output
    assert "TensorRT" in res.output and "atexport[tensorrt]" in res.output
    (runtime_dir / "fake.engine.json").unlink()
    with pytest.raises(BadInputError, match="sidecar"):
        load_model(engine)


# ------------------------------------------------------------------------------------------ CLI


def test_predict_cli(sep_onnx, tiny_ckpt, photo_files, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from atexport.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["predict", "--model", str(sep_onnx), *map(str, photo_files[:3]), "--top-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    ref = torch_logits(tiny_ckpt, [Image.open(p) for p in photo_files[:3]])
    assert [p["index"] for p in doc["predictions"]] == ref.argmax(1).tolist()
    assert [p["source"] for p in doc["predictions"]] == [str(p) for p in photo_files[:3]]
    assert all(len(p["topk"]) == 2 for p in doc["predictions"])
    res = runner.invoke(cli, ["predict", "--model", str(sep_onnx), str(photo_files[0].parent)])
    assert res.exit_code == 0 and len(res.output.strip().splitlines()) == len(photo_files) * 6  # label + 5 top-k lines
    for args, needle in (
        ([str(tmp_path / "missing.png")], "missing.png: no such image file"),
        (["--top-k", "0", str(photo_files[0])], "--top-k"),
    ):
        res = runner.invoke(cli, ["predict", "--model", str(sep_onnx), *args])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    res = runner.invoke(cli, ["predict", "--model", str(bad), str(photo_files[0])])
    assert res.exit_code == 2 and "bad.onnx" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["export-task", "--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "t.npz")])
    assert res.exit_code == 0 and (tmp_path / "t.npz").is_file()
    res = runner.invoke(cli, ["predict", "--model", str(sep_onnx), "--task", str(tmp_path / "t.npz"), str(photo_files[0])])
    assert res.exit_code == 0 and "[tiny_a]" in res.output
