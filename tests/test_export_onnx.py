"""ONNX export: parity at batch 1 and 4 through one dynamic model, graph shape, metadata, errors, CLI.

Exports are expensive (a few seconds each), so every export is made once per session through
:func:`export_cached`, which ``test_swap.py`` shares.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from _helpers import TINY_ARGS, real_photos

from atexport.errors import BadInputError, IncompatibleCheckpointError, ParityError

_CACHE: dict = {}


def export_cached(out_dir, ckpt, name, **kwargs):
    """Export ``ckpt`` once per session (keyed by ``name``); returns the ExportResult."""
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    if name not in _CACHE:
        _CACHE[name] = export_onnx(ckpt, out_dir / f"{name}.onnx", ExportSettings(**kwargs))
    return _CACHE[name]


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(
    scope="session",
    params=[(1, True), (1, False), (2, True), (2, False)],
    ids=lambda p: f"every{p[0]}-{'slim' if p[1] else 'raw'}",
)
def separable_export(request, onnx_dir, tiny_ckpt, tiny_ckpt_every2):
    every, simplify = request.param
    ckpt = tiny_ckpt if every == 1 else tiny_ckpt_every2
    name = f"sep_every{every}_{'slim' if simplify else 'raw'}"
    return ckpt, export_cached(onnx_dir, ckpt, name, separable=True, simplify=simplify)


@pytest.fixture(scope="session")
def fused_export(onnx_dir, tiny_ckpt):
    return tiny_ckpt, export_cached(onnx_dir, tiny_ckpt, "fused")


def _torch_model(ckpt_path):
    from atexport.checkpoint import build_model, load_checkpoint

    return build_model(load_checkpoint(ckpt_path))


def _torch_logits(model, x):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _photos(preprocess):
    from atexport.runtime.preprocess import Preprocessor

    return Preprocessor(preprocess)(real_photos())


# ---------------------------------------------------------------------------------------------- parity


def test_separable_export_passes_parity_at_batch_1_and_4(separable_export):
    _, result = separable_export
    assert result.passed and result.path.is_file()
    names = [r.name for r in result.parity]
    assert names == ["photos (batch 1)", "random (batch 1)", "photos (batch 4)", "random (batch 4)"]
    assert all(r.max_abs < 1e-4 and r.top1_agreement == 1.0 for r in result.parity)
    assert result.parity[0].samples >= 10  # the real photos


def test_one_dynamic_model_runs_batch_1_and_4_like_pytorch(separable_export):
    """Independent of check_parity: the file itself, ORT at full optimisation, against torch."""
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    ckpt, result = separable_export
    model = _torch_model(ckpt)
    photos = _photos(result.metadata.preprocess)[:4]
    with OnnxRuntimeRunner(result.path) as r:
        assert r.session.get_inputs()[0].shape[0] == "batch"
        assert [i.name for i in r.session.get_inputs()] == ["input"]  # task weights have defaults
        for x in (photos[:1], photos):
            np.testing.assert_allclose(r.infer(x), _torch_logits(model, x), atol=1e-5, rtol=1e-5)


def test_simplification_reduces_nodes_and_is_reported(separable_export):
    _, result = separable_export
    meta_nodes = result.metadata.extra["nodes"]
    if result.simplifier:
        assert result.nodes["simplified"] < result.nodes["exported"]
        assert meta_nodes == result.nodes
        assert result.metadata.extra["export"]["simplifier"] == "onnxslim"
    else:
        assert result.nodes["simplified"] is None


def test_fixed_batch(onnx_dir, tiny_ckpt):
    import onnx

    result = export_cached(onnx_dir, tiny_ckpt, "fixed2", batch=2, simplify=False)
    assert [r.name for r in result.parity] == ["photos (batch 2)", "random (batch 2)"]  # odd count: padded
    assert result.metadata.input["shape"] == [2, 3, 32, 32]
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 32, 32]


# ------------------------------------------------------------------------------------------ graph form


def test_layernorm_and_gelu_stay_single_nodes(fused_export, separable_export):
    from atexport.adapter import AdapterConfig

    for ckpt, result in (fused_export, separable_export):
        ops = result.metadata.extra["ops"]
        depth = TINY_ARGS["depth"]
        every = result.metadata.adapter["every"]
        adapters = len(AdapterConfig(rank=4, every=every).placed(depth))
        assert ops["LayerNormalization"] == 2 * depth + 1
        assert ops["Gelu"] == depth + adapters
        assert "Erf" not in ops


def test_manifest_names_are_initializers_and_inputs(separable_export):
    import onnx

    from atexport.checkpoint import load_checkpoint

    ckpt, result = separable_export
    model = onnx.load(str(result.path))
    inits = {i.name: i for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    sd = load_checkpoint(ckpt).state_dict
    manifest = result.metadata.manifest
    assert set(manifest) == set(sd)  # every adapter and head tensor, nothing else
    assert "blocks.0.adapter.down.weight" in manifest and "head.weight" in manifest
    for name, entry in manifest.items():
        assert entry["initializer"] == name and name in inits and name in inputs
        assert list(inits[name].dims) == entry["shape"] == list(sd[name].shape)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[name]), sd[name].numpy())
    blocks = {e["block"] for e in manifest.values() if e["role"] == "adapter"}
    assert blocks == set(range(0, TINY_ARGS["depth"], result.metadata.adapter["every"]))


def test_torchscript_exporter_pitfall_and_pinned_exporter(tmp_path):
    """The TorchScript exporter decomposes GELU and merges the zero-initialised up weights into one
    tensor; the pinned dynamo export with lifted tensors keeps one named tensor per adapter."""
    import io

    import onnx
    import torch
    from _helpers import tiny_spec

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.export.onnx import bind_initializers, export_module, op_counts
    from atexport.models import create_backbone

    model = inject_adapters(create_backbone(tiny_spec()), AdapterConfig(rank=4)).eval()  # zero-init up
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["input"])
    except Exception as e:  # the TorchScript exporter may be gone in a later torch
        pytest.skip(f"TorchScript exporter unavailable: {e}")
    ts = onnx.load_from_string(buf.getvalue())
    ops = op_counts(ts)
    assert ops.get("Gelu", 0) == 0 and ops.get("Erf", 0) > 0
    ts_inits = {i.name for i in ts.graph.initializer}
    assert not any(n.endswith("adapter.up.weight") for n in ts_inits)  # merged away, unswappable

    ups = {n: p.detach() for n, p in model.named_parameters() if n.endswith("adapter.up.weight")}
    proto = export_module(model, x, ups, opset=20)
    ops = op_counts(proto)
    assert ops["Gelu"] == 8 and ops["LayerNormalization"] == 9 and "Erf" not in ops
    bind_initializers(proto, ups)
    inits = {i.name for i in proto.graph.initializer}
    assert set(ups) <= inits and len(ups) == 4


def test_simplifiers_keep_lifted_inputs_only_before_binding():
    """Why the manifest's tensors are bound after simplifying: as initializers, they get folded away."""
    import onnx
    import torch
    from _helpers import tiny_spec

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.errors import AtexportError
    from atexport.export.onnx import bind_initializers, export_module
    from atexport.export.simplify import require_inputs, simplify
    from atexport.models import create_backbone

    model = inject_adapters(create_backbone(tiny_spec()), AdapterConfig(rank=4, init="small")).eval()
    lifted = {n: p.detach() for n, p in model.named_parameters() if ".adapter." in n or n.startswith("head.")}
    raw = export_module(model, torch.randn(2, 3, 32, 32), lifted)
    import importlib.util

    # onnxslim is a dependency; onnxsim (the optional alternative) is checked where installed.
    tools = [t for t in ("onnxslim", "onnxsim") if importlib.util.find_spec(t) is not None]
    assert "onnxslim" in tools
    for tool in tools:
        slim, stats = simplify(raw, tool)
        assert stats.nodes_after < stats.nodes_before
        require_inputs(slim, list(lifted))
        bound = onnx.ModelProto()
        bound.CopyFrom(raw)
        bind_initializers(bound, lifted)
        folded, _ = simplify(bound, tool)
        with pytest.raises(AtexportError, match="lost the swappable inputs"):
            require_inputs(folded, list(lifted))


def test_export_module_extra_inputs():
    """The reusable exporter: lifted tensors plus an extra batch-aligned input, dynamic batch."""
    import torch

    from atexport.export.onnx import export_module

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(4, 3)

        def forward(self, x, task_id):
            return torch.where(task_id[:, None] == 0, self.a(x), self.b(x))

    m = Toy().eval()
    proto = export_module(
        m, torch.randn(3, 4), {"b.weight": m.b.weight}, extra_inputs={"task_id": torch.zeros(3, dtype=torch.long)},
        extra_dynamic={"task_id": {0: "batch"}},
    )
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert shapes == {"input": ["batch", 4], "b.weight": [3, 4], "task_id": ["batch"]}
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["batch", 3]


# -------------------------------------------------------------------------------------------- metadata


def test_metadata_round_trips_and_is_enough_to_feed_the_model(fused_export, separable_export):
    import onnx
    import onnxruntime as ort

    from atexport.checkpoint import load_checkpoint
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.preprocess import Preprocessor

    for ckpt_path, result in (fused_export, separable_export):
        ckpt = load_checkpoint(ckpt_path)
        meta = read_onnx_metadata(onnx.load(str(result.path)))
        assert meta.to_json() == result.metadata.to_json()
        assert meta.backbone["name"] == ckpt.model.backbone and meta.backbone["fingerprint"] == ckpt.fingerprint
        assert meta.backbone["model_args"] == ckpt.model.model_args
        assert meta.input == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW"}
        assert meta.output["shape"] == ["batch", 5] and meta.num_classes == 5
        assert meta.preprocess == ckpt.preprocess and meta.class_names == ckpt.model.class_names
        assert meta.adapter == ckpt.adapter.to_dict() and meta.regime == "adapter" and meta.precision == "fp32"
        assert meta.task == ckpt_path.stem
        assert all(r["passed"] for r in meta.extra["parity"])
        assert meta.extra["export"]["opset"] == 20 and meta.separable == bool(meta.manifest)
        # flat keys for humans and tools, readable by onnxruntime alone
        props = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        assert json.loads(props["atexport.preprocess"]) == ckpt.preprocess
        # an app with only the file: metadata -> preprocessing -> logits -> class names
        x = Preprocessor(meta.preprocess)(real_photos()[:3])
        logits = OnnxRuntimeRunner(result.path).infer(x)
        ref = _torch_logits(_torch_model(ckpt_path), x)
        assert [meta.class_names[i] for i in logits.argmax(1)] == [meta.class_names[i] for i in ref.argmax(1)]


# ------------------------------------------------------------------------------------- parity helpers


def test_sample_images_are_real_photos_of_several_modes():
    from atexport.parity import photo_batch, sample_images

    imgs = sample_images()
    assert len(imgs) >= 10
    assert {"RGB", "L", "RGBA", "P"} <= {im.mode for im in imgs}
    assert len({im.size for im in imgs}) >= 5
    assert all(im.info.get("name") for im in imgs)
    pre = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9}
    x = photo_batch(pre, max_images=4)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()


def test_load_images_errors(tmp_path):
    from atexport.parity.images import load_images

    with pytest.raises(BadInputError, match="no such folder"):
        load_images(tmp_path / "none")
    with pytest.raises(BadInputError, match="no image files"):
        load_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match="broken.png"):
        load_images(tmp_path)


def test_run_batched_pads_fixed_batches():
    from atexport.runtime.base import Runner
    from atexport.runtime.batching import run_batched

    class Fixed(Runner):
        def _infer(self, batch, **feeds):
            assert len(batch) == 4
            return batch.reshape(len(batch), -1)[:, :3]

    x = np.arange(7 * 3 * 2 * 2, dtype=np.float32).reshape(7, 3, 2, 2)
    np.testing.assert_array_equal(run_batched(Fixed(), x, 4), x.reshape(7, -1)[:, :3])


# ---------------------------------------------------------------------------------------------- errors


def test_missing_checkpoint(tmp_path):
    from atexport.export.onnx import export_onnx

    with pytest.raises(BadInputError, match="no such checkpoint"):
        export_onnx(tmp_path / "nope.pt", tmp_path / "m.onnx")


def test_not_a_checkpoint(tmp_path):
    from atexport.export.onnx import export_onnx

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(BadInputError, match="not a readable atexport checkpoint"):
        export_onnx(bad, tmp_path / "m.onnx")


def test_unwritable_output(tmp_path, tiny_ckpt):
    from atexport.export.onnx import export_onnx

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInputError, match="-o"):
        export_onnx(tiny_ckpt, blocker / "m.onnx")
    with pytest.raises(BadInputError, match="directory"):
        export_onnx(tiny_ckpt, tmp_path)


@pytest.mark.parametrize("kwargs,match", [({"opset": 17}, "opset >= 20"), ({"batch": 0}, "positive integer")])
def test_bad_flags(tmp_path, tiny_ckpt, kwargs, match):
    """Bad settings are refused when the settings are made, once for both exporters, before any checkpoint is
    read or model built."""
    from atexport.export.multitask import export_multitask
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    with pytest.raises(BadInputError, match=match):
        export_onnx(tiny_ckpt, tmp_path / "m.onnx", ExportSettings(**kwargs))
    with pytest.raises(BadInputError, match=match):
        export_multitask([tmp_path / "not_read.pt"], tmp_path / "m.onnx", ExportSettings(**kwargs))
    assert not (tmp_path / "m.onnx").exists()


def test_separable_refuses_full_finetune(tiny_ckpt):
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.export.onnx import swappable_names

    ckpt = load_checkpoint(tiny_ckpt)
    model = build_model(ckpt)
    ckpt.regime = "full"
    with pytest.raises(IncompatibleCheckpointError, match="full"):
        swappable_names(ckpt, model)


def test_other_backbone_is_refused(tmp_path, tiny_ckpt):
    from atexport.checkpoint import load_checkpoint, save_checkpoint
    from atexport.export.onnx import export_onnx

    ckpt = load_checkpoint(tiny_ckpt)
    ckpt.model.source = {"kind": "random", "seed": 7}  # a different backbone than it was trained on
    other = tmp_path / "other_backbone.pt"
    save_checkpoint(ckpt, other)
    with pytest.raises(IncompatibleCheckpointError, match="fingerprint"):
        export_onnx(other, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------------------- CLI


def _strict_tolerances(tmp_path):
    tol = tmp_path / "impossible.yaml"
    tol.write_text("tolerances:\n  fp32: {max_abs: 1.0e-3, max_rel: 1.0e-4, min_cosine: 1.5, min_top1_agreement: 1.0}\n")
    cfg = tmp_path / "strict.yaml"
    cfg.write_text(f"export: {{opset: 20, simplify: false}}\nparity: {{tolerances: {tol}, random_inputs: 2, batch_sizes: [2]}}\n")
    return cfg


def test_cli_export_and_parity_failure(tmp_path, tiny_ckpt):
    from click.testing import CliRunner

    from atexport.cli import cli

    runner = CliRunner()
    out = tmp_path / "ok" / "model.onnx"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    real_photos()[1].save(imgs / "cat.jpg")
    (imgs / "notes.txt").write_text("not an image, ignored")
    res = runner.invoke(
        cli, ["onnx", "--ckpt", str(tiny_ckpt), "-o", str(out), "--separable", "--task-name", "birds", "--images", str(imgs)]
    )
    assert res.exit_code == 0, res.output
    assert out.is_file() and "photos (batch 4)" in res.output and "after onnxslim" in res.output
    assert "task 'birds'" in res.output
    import onnx

    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.parity import sample_images

    meta = read_onnx_metadata(onnx.load(str(out)))
    assert meta.task == "birds" and meta.extra["parity"][0]["samples"] == len(sample_images()) + 1

    bad = tmp_path / "bad" / "model.onnx"
    res = runner.invoke(cli, ["onnx", "--ckpt", str(tiny_ckpt), "-o", str(bad), "--config", str(_strict_tolerances(tmp_path))])
    assert res.exit_code == ParityError.exit_code
    assert "Traceback" not in res.output and "min cosine" in res.output and "max abs" in res.output
    assert not bad.exists()
    assert (bad.parent / "model.failed.onnx").is_file()


def test_cli_errors_are_clean(tmp_path, tiny_ckpt):
    from click.testing import CliRunner

    from atexport.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["onnx", "--ckpt", str(tmp_path / "missing.pt")])
    assert res.exit_code == BadInputError.exit_code and "no such checkpoint" in res.output
    blocker = tmp_path / "f"
    blocker.write_text("x")
    res = runner.invoke(cli, ["onnx", "--ckpt", str(tiny_ckpt), "-o", str(blocker / "m.onnx")])
    assert res.exit_code == BadInputError.exit_code and "not a folder" in res.output
    res = runner.invoke(cli, ["onnx", "--ckpt", str(tiny_ckpt), "--opset", "17", "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == BadInputError.exit_code and "opset >= 20" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "m.onnx").exists()
