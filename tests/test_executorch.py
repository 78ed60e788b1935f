"""ExecuTorch export and runner: real XNNPACK lowerings of tiny ViTs, run in ExecuTorch's runtime against PyTorch.

Each lowering of the tiny ViT takes ~12-30 s on 2 cores; models are built once per session.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("executorch.runtime", reason="needs executorch: pip install 'atexport[executorch]'")

from _helpers import random_inputs, real_photos

from atexport.errors import BadInputError, MissingDependencyError


@pytest.fixture(scope="session")
def et_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("executorch")


@pytest.fixture(scope="session")
def sep(tiny_ckpt, et_dir):
    from atexport.export.executorch import export_executorch

    return export_executorch(tiny_ckpt, et_dir / "sep.pte", separable=True)


def _torch_logits(ckpt, x):
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.runtime.torch import TorchRunner

    with TorchRunner(build_model(load_checkpoint(ckpt).for_export())) as ref:
        return ref.infer(x)


def test_separable_fp32_verified_and_swaps(sep, tiny_ckpt, tiny_ckpt_b, tmp_path):
    from atexport.checkpoint import export_task_weights
    from atexport.runtime import load_model

    assert sep.passed and all(r.max_abs <= 1e-4 for r in sep.parity)
    side = json.loads(sep.path.with_name("sep.pte.json").read_text())
    record = side["metadata"]["extra"]["executorch"]
    assert side["artifact"]["format"] == "executorch" and record["delegate"] == "xnnpack"
    assert sorted(record["weight_inputs"].values()) == list(range(1, len(sep.metadata.manifest) + 1))
    with load_model(sep.path) as m:
        assert (m.backend, m.mode) == ("executorch", "separable")
        x = np.concatenate([m.preprocess(real_photos()[:4]), random_inputs(2)])
        own = m.logits(x)
        assert np.abs(own - _torch_logits(tiny_ckpt, x)).max() <= 1e-4
        m.set_task(export_task_weights(tiny_ckpt_b, tmp_path / "b.npz", name="b"))
        swapped = m.logits(x)
        assert m.predict(real_photos()[:1])[0].task == "b"
    assert np.abs(swapped - _torch_logits(tiny_ckpt_b, x)).max() <= 1e-4


def test_int8_fused(tiny_ckpt, et_dir, sep):
    from atexport.export.executorch import export_executorch
    from atexport.runtime import load_model

    res = export_executorch(tiny_ckpt, et_dir / "m.int8.pte", precision="int8")
    assert res.passed and res.metadata.precision == "int8" and not res.metadata.separable
    assert res.size_bytes < 0.5 * sep.size_bytes
    assert all(r.top1_agreement == 1.0 and r.min_cosine > 0.999 for r in res.parity)
    with load_model(res.path) as m:
        assert (m.mode, m.precision) == ("single", "int8")
        assert m.predict(real_photos()[:2])[0].label.startswith("class_")


def test_bad_inputs(tiny_ckpt, tmp_path, monkeypatch):
    from atexport.export.executorch import export_executorch

    with pytest.raises(BadInputError, match="ending in .pte"):
        export_executorch(tiny_ckpt, tmp_path / "m.tflite", verify=False)
    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(MissingDependencyError, match=r"atexport\[executorch\]") as e:
        export_executorch(tiny_ckpt, tmp_path / "m.pte")
    assert e.value.exit_code == 4


def test_cli(tiny_ckpt, sep, et_dir):
    from click.testing import CliRunner

    from atexport.cli import cli

    bad = CliRunner().invoke(cli, ["executorch", "--ckpt", str(tiny_ckpt), "-o", str(et_dir / "x.onnx")])
    assert bad.exit_code == 2 and "ending in .pte" in bad.output
    img = et_dir / "red.png"
    from PIL import Image

    Image.new("RGB", (50, 40), (220, 20, 20)).save(img)
    res = CliRunner().invoke(cli, ["predict", "--model", str(sep.path), str(img)])
    assert res.exit_code == 0, res.output
    assert "class_" in res.output


def test_multitask_task_id_input(tiny_ckpt, tiny_ckpt_b, et_dir):
    from atexport.export.edge_multitask import export_multitask_edge
    from atexport.runtime import load_model

    res = export_multitask_edge([tiny_ckpt, tiny_ckpt_b], et_dir / "tasks.pte", "executorch")
    assert res.passed and len(res.parity) == 4 and all(r.max_abs <= 1e-4 for r in res.parity)
    with load_model(res.path) as m:
        assert (m.backend, m.mode, m.tasks) == ("executorch", "multitask", ["tiny_a", "tiny_b"])
        x = m.preprocess(real_photos()[:2])
        got = m.logits(x, task=["tiny_b", "tiny_a"])
    want = np.stack([_torch_logits(tiny_ckpt_b, x)[0], _torch_logits(tiny_ckpt, x)[1]])
    assert np.abs(got - want).max() <= 1e-4


def test_int8_static_calibrated(tiny_ckpt, et_dir, tmp_path):
    from atexport.export.executorch import export_executorch

    with pytest.raises(BadInputError, match="--calib applies to --precision int8-static"):
        export_executorch(tiny_ckpt, tmp_path / "m.pte", precision="int8", calib="digits")
    res = export_executorch(tiny_ckpt, et_dir / "m.int8s.pte", precision="int8-static", calib="digits", calib_count=16)
    assert res.passed and res.metadata.precision == "int8"
    record = res.metadata.extra["executorch"]
    assert record["quantization"].endswith("static") and record["calibration"]["count"] == 16
    held = [r for r in res.parity if "held-out digits" in r.name]  # judged on images it was not calibrated on
    assert held and held[0].samples == 128 and held[0].judged and held[0].passed, [r.name for r in res.parity]


def test_swap_and_verify(sep, tiny_ckpt_b, et_dir):
    from click.testing import CliRunner

    from _helpers import make_checkpoint
    from atexport.cli import cli
    from atexport.export.executorch import export_executorch
    from atexport.export.task_swap import swap

    out = swap(sep.path, tiny_ckpt_b, et_dir / "b.pte", verify=True)
    assert out.path.read_bytes() == sep.path.read_bytes() and out.metadata.task == "tiny_b" and out.parity
    ckpt = make_checkpoint(et_dir / "digits10.pt", num_classes=10, weight_seed=5)
    pte = export_executorch(ckpt, et_dir / "d10.pte", verify=False).path
    res = CliRunner().invoke(cli, ["verify", "--ckpt", str(ckpt), "--executorch", str(pte), "--dataset", "digits",
                                   "--limit", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "executorch fp32" in res.output
