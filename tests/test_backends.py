"""The backend table (``atexport.runtime.backends.BACKENDS``) is the one place a runtime backend is named.

Every backend module of the runtime has a row, every row's loader and Triton reader resolve, and a toy
backend (a real tiny runner: a numpy matrix product) added as one row is picked up by ``load_model`` and
artifact reading without any other edit.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from atexport.errors import BadInputError
from atexport.runtime.backends import BACKENDS, Backend, LoadOptions, Opened, backend_for, choosable, resolve
from atexport.runtime.base import Runner

RUNTIME = Path(__file__).resolve().parents[1] / "atexport" / "runtime"
# runtime modules that define runners but are no backend of their own, and why
NOT_BACKENDS = {
    "base": "the Runner interface itself",
    "edge": "the base both on-device runners (litert, executorch) share",
    "session": "ONNX Runtime's separable runner (and its loader): part of the onnxruntime backend",
    "tasks": "wraps another backend's runner to run one task of a multi-task model",
    "torch": "the PyTorch baseline: runs an nn.Module, not a file",
}


def _runner_modules() -> set[str]:
    """Runtime modules that define a class deriving from a runner (by name: *Runner, Runner, TaskHolder)."""
    out = set()
    for path in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
                if any(b.endswith("Runner") or b == "TaskHolder" for b in bases):
                    out.add(path.stem)
    return out


def test_every_backend_module_has_a_row():
    modules = _runner_modules()
    assert {"onnxruntime", "openvino", "tensorrt", "litert", "executorch"} <= modules
    lacking = sorted(m for m in modules - set(NOT_BACKENDS) if m not in BACKENDS)
    assert not lacking, f"runtime modules with a runner but no row in BACKENDS: {lacking}"
    for name in BACKENDS:
        assert (RUNTIME / f"{name}.py").is_file(), f"row {name!r} has no module atexport/runtime/{name}.py"


# ids in capitals: a lower-case "tensorrt" id would mark the test as needing TensorRT (conftest)
@pytest.mark.parametrize("name", list(BACKENDS), ids=lambda n: f"row-{n.upper()}")
def test_every_row_resolves(name):
    row = BACKENDS[name]
    assert callable(resolve(row.open)) and row.suffixes and row.label
    if row.triton is not None:
        assert callable(resolve(row.triton.io))
        assert row.triton.parameters is None or callable(resolve(row.triton.parameters))
    for suffix in row.suffixes:
        assert backend_for(Path(f"m{suffix}")) is not None


def test_the_table_answers_every_consumer():
    assert backend_for("m.onnx").name == "onnxruntime" and backend_for("m.xml").name == "openvino"
    assert backend_for("m.plan").name == "tensorrt" and backend_for("m.pte").name == "executorch"
    assert backend_for("m.bin") is None
    assert choosable() == ["onnxruntime", "openvino"]  # the backends that share a file type
    assert [b.name for b in BACKENDS.values() if b.triton] == ["onnxruntime", "openvino", "tensorrt"]


# ------------------------------------------------------------------------------------------ a toy backend

META = {"backbone": {"name": "toy", "fingerprint": "toy"},
        "input": {"name": "input", "shape": ["batch", 3, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 3]},
        "preprocess": {"input_size": [3, 8, 8], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                       "crop_pct": 1.0, "crop_mode": "center"},
        "class_names": ["ant", "bee", "cat"], "num_classes": 3}


class NumpyRunner(Runner):
    """A real runner of a ``.npmodel`` (an ``.npz`` holding a weight matrix and the metadata): ``x @ W``."""

    name = "numpy"

    def __init__(self, path):
        super().__init__()
        self.path, self.w, self.metadata = path, None, None

    def _activate(self):
        from atexport.artifact.metadata import ModelMetadata

        with np.load(self.path) as d:
            self.w = d["W"].astype(np.float32)
            self.metadata = ModelMetadata.from_json(str(d["meta"]), str(self.path))

    def _infer(self, batch, **feeds):
        return batch.reshape(len(batch), -1) @ self.w


def open_numpy(path, options):
    """The toy backend's loader."""
    runner = NumpyRunner(path).activate()
    return Opened(runner.metadata, runner, runner.metadata.mode)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS, "numpy", Backend("numpy", "numpy", (".npmodel",), "a numpy .npmodel", open_numpy))
    path = tmp_path / "toy.npmodel"
    w = np.random.default_rng(0).standard_normal((3 * 8 * 8, 3)).astype(np.float32)
    with open(path, "wb") as f:  # (np.savez would add .npz to a name)
        np.savez(f, W=w, meta=np.array(json.dumps(META)))
    return path, w


def test_a_new_backend_is_one_row(toy):
    from atexport.runtime import load_model
    from atexport.runtime.artifacts import Artifact, read_artifact

    path, w = toy
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with load_model(path) as m:
        assert (m.backend, m.mode, m.precision) == ("numpy", "single", "fp32")
        assert np.allclose(m.logits(x), x.reshape(2, -1) @ w, atol=1e-5)
        assert m.predict(x, top_k=2)[0].label in META["class_names"]
    with pytest.raises(BadInputError, match="runs at the precision it was exported with"):
        load_model(path, precision="bf16")
    with pytest.raises(BadInputError, match="expected one of onnxruntime, openvino"):
        load_model(path, backend="numpy")  # a file only one backend reads: no --backend to choose
    loaded = read_artifact(Artifact(path, "--numpy", None, "numpy"))
    assert (loaded.backend, loaded.precision, loaded.batch, loaded.pads) == ("numpy", "fp32", None, False)
    with loaded.runner as r:
        assert np.allclose(r.infer(x), x.reshape(2, -1) @ w, atol=1e-5)


def test_unknown_files_name_every_backend(tmp_path):
    from atexport.runtime import load_model

    p = tmp_path / "model.bin"
    p.write_bytes(b"x")
    with pytest.raises(BadInputError, match=r"unknown model type '\.bin'; give an \.onnx model, .* ExecuTorch \.pte"):
        load_model(p)


def test_load_options_refusals_come_from_the_rows(tmp_path):
    from atexport.runtime import load_model

    for name, kwargs, match in (("m.engine", {"backend": "openvino"}, "is a TensorRT engine"),
                                ("m.engine", {"precision": "fp16"}, "runs at the precision it was built with"),
                                ("m.xml", {"backend": "onnxruntime"}, "is an OpenVINO IR"),
                                ("m.onnx", {"precision": "bf16"}, "ONNX Runtime runs a model at the precision"),
                                ("m.onnx", {"backend": "openvino", "providers": ["CPUExecutionProvider"]},
                                 "execution providers are ONNX Runtime's"),
                                ("m.tflite", {"precision": "fp16"}, "runs in litert only")):
        p = tmp_path / name
        p.write_bytes(b"x")
        with pytest.raises(BadInputError, match=match):
            load_model(p, **kwargs)
    assert LoadOptions().app and LoadOptions().flag == "--model"
