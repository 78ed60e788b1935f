"""The torch-free TensorRT runner and its CUDA wrapper.

Here (no TensorRT, no GPU): the CUDA runtime library lookup and its one-sentence errors, both CUDA
backends' answer on a machine without a usable GPU, TensorRT dtype mapping, host-buffer shaping (image
and the multi-task ``task_id``), the runner's whole call sequence against a fake TensorRT engine and a
fake GPU, and that importing and activating the runner never imports torch. With a GPU (``gpu``) a real
device round trip; with TensorRT (``tensorrt``, in test_trt_plan.py) real engines.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from atexport.errors import BadInputError, MissingDependencyError
from atexport.runtime import cuda as cuda_mod
from atexport.runtime.tensorrt import TensorRTRunner, host_inputs, image_input, numpy_dtype

# ------------------------------------------------------------------------------------- CUDA lookup


def test_cudart_lookup_without_cuda_is_one_sentence(tmp_path):
    (tmp_path / "libcudart.so.99").write_bytes(b"not a shared library")  # found, but does not load
    with pytest.raises(MissingDependencyError) as e:
        cuda_mod.load_cudart(dirs=[str(tmp_path)], fallback=None)
    msg = str(e.value)
    assert "libcudart.so" in msg and str(tmp_path) in msg and "pip install" in msg and "cuda-python" in msg
    assert msg.count(". ") <= 2 and "\n" not in msg


def test_no_cuda_python_and_no_cudart(monkeypatch):
    monkeypatch.setattr(cuda_mod, "_cuda_python", lambda: (None, None))
    monkeypatch.setattr(cuda_mod, "search_dirs", lambda environ=None: ["/nowhere"])
    monkeypatch.setattr(cuda_mod.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(cuda_mod, "_RUNTIME", None)
    real_cdll = ctypes.CDLL

    def no_default(name, *a, **k):
        if name == "libcudart.so":
            raise OSError("not found")
        return real_cdll(name, *a, **k)

    monkeypatch.setattr(cuda_mod.ctypes, "CDLL", no_default)
    with pytest.raises(MissingDependencyError, match=r"neither cuda-python nor the CUDA runtime library \(libcudart"):
        cuda_mod.cuda_runtime()
    with pytest.raises(MissingDependencyError, match="pip install cuda-python"):
        cuda_mod.cuda_runtime("cuda-python")


def test_cudart_search_order(tmp_path):
    env = {"LD_LIBRARY_PATH": f"{tmp_path}/a:{tmp_path}/b", "CUDA_HOME": "/opt/cuda"}
    dirs = cuda_mod.search_dirs(env)
    assert dirs[:4] == [f"{tmp_path}/a", f"{tmp_path}/b", "/opt/cuda/lib64", "/opt/cuda/lib"]
    assert dirs.index("/usr/local/cuda/lib64") < dirs.index("/usr/lib")  # Polygraphy's order
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.12.4.127", "libcudart_static.a"):
        (tmp_path / name).write_bytes(b"")
    found = [p.rsplit("/", 1)[1] for p in cuda_mod.find_cudart([str(tmp_path)])]
    assert found == ["libcudart.so.12.4.127", "libcudart.so.12", "libcudart.so"]


@pytest.mark.parametrize("backend", ["cuda-python", "ctypes"])
def test_cuda_backend_without_a_gpu_says_so(backend):
    """Real CUDA runtime calls where the library is installed but no GPU is usable (this machine)."""
    try:
        rt = cuda_mod.cuda_runtime(backend)
    except MissingDependencyError as e:
        pytest.skip(f"{backend} not available here: {e}")
    try:
        n = rt.device_count()
    except cuda_mod.NoCudaDevice as e:
        msg = str(e)
        assert msg.startswith("no CUDA GPU is usable on this machine") and backend in msg and "error" in msg
        with pytest.raises(cuda_mod.NoCudaDevice):
            rt.device_info(0)
        return
    if n:
        pytest.skip("a GPU is present (see test_cuda_round_trip_on_the_gpu)")


def test_cuda_device_without_gpu_names_the_rebuild(monkeypatch):
    from atexport.runtime.tensorrt import cuda_device

    class NoGpu(cuda_mod.CudaRuntime):
        kind = "fake"

        def _call(self, name, *args):
            self._fail(name, 100)

        def error_string(self, code):
            return "no CUDA-capable device is detected"

    monkeypatch.setattr(cuda_mod, "_RUNTIME", NoGpu())
    with pytest.raises(MissingDependencyError) as e:
        cuda_device()
    assert "no CUDA-capable device is detected" in str(e.value) and "atexport trt --onnx" in str(e.value)


@pytest.mark.gpu
def test_cuda_round_trip_on_the_gpu():
    rt = cuda_mod.cuda_runtime()
    info = rt.device_info(0)
    assert info["name"] and len(info["compute_capability"]) == 2
    stream = rt.stream_create()
    buf = cuda_mod.DeviceBuffer(rt)
    x = np.arange(1000, dtype=np.int64)
    y = np.empty_like(x)
    rt.copy_to_device(buf.ensure(x.nbytes), x, stream)
    rt.copy_to_host(y, buf.ptr, stream)
    rt.stream_synchronize(stream)
    buf.free()
    rt.stream_destroy(stream)
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------- dtypes and host buffers


def test_tensorrt_dtype_mapping():
    for name, want in (("FLOAT", np.float32), ("HALF", np.float16), ("INT32", np.int32), ("INT64", np.int64),
                       ("INT8", np.int8), ("UINT8", np.uint8), ("BOOL", np.bool_)):
        assert numpy_dtype(SimpleNamespace(name=name)) == np.dtype(want)  # a pybind11 enum member has .name
    assert numpy_dtype("DataType.HALF") == np.dtype(np.float16)
    with pytest.raises(BadInputError, match="BF16"):
        numpy_dtype(SimpleNamespace(name="BF16"))


INPUTS = {"input": np.dtype(np.float32), "task_id": np.dtype(np.int64)}


def test_host_inputs_shape_and_cast():
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8))
    host = host_inputs(INPUTS, "input", x, {"task_id": [0, 2, 1]})
    assert host["input"].dtype == np.float32 and host["input"].flags["C_CONTIGUOUS"] and host["input"].shape == x.shape
    assert host["task_id"].dtype == np.int64 and host["task_id"].tolist() == [0, 2, 1]
    assert host_inputs(INPUTS, "input", x, {"task_id": 1})["task_id"].tolist() == [1, 1, 1]  # one task for all
    assert host_inputs(INPUTS, "input", x, {"task_id": np.array([0, 1, 1], np.int32)})["task_id"].dtype == np.int64
    fp16 = host_inputs({"input": np.dtype(np.float16)}, "input", x[:, :, ::2, ::2], {})
    assert fp16["input"].dtype == np.float16 and fp16["input"].flags["C_CONTIGUOUS"]
    i32 = host_inputs({**INPUTS, "task_id": np.dtype(np.int32)}, "input", x, {"task_id": np.array([0, 1, 2])})
    assert i32["task_id"].dtype == np.int32


@pytest.mark.parametrize("feeds, match", [
    ({}, r"also takes the inputs \['task_id'\].*task_id=np.zeros"),
    ({"task_id": [0, 1, 0], "tasks": [1]}, r"has no inputs \['tasks'\]"),
    ({"task_id": [0, 1]}, r"task_id has shape \[2\]; it needs one value per sample \(3\)"),
    ({"task_id": [0.0, 1.0, 1.0]}, "must hold integers"),
    ({"task_id": [0, 1, 0], "input": np.zeros((3, 3, 8, 8))}, "first argument"),
])
def test_host_inputs_refusals(feeds, match):
    with pytest.raises(BadInputError, match=match):
        host_inputs(INPUTS, "input", np.zeros((3, 3, 8, 8), np.float32), feeds)


def test_host_inputs_int32_range():
    with pytest.raises(BadInputError, match="range"):
        host_inputs({"input": np.dtype(np.float32), "task_id": np.dtype(np.int32)}, "input",
                    np.zeros((1, 3, 8, 8), np.float32), {"task_id": np.array([2**40])})


def test_image_input_choice():
    assert image_input(INPUTS, "input") == "input"
    assert image_input(INPUTS, None) == "input"  # the only float input
    with pytest.raises(BadInputError, match="cannot tell"):
        image_input({"a": np.dtype(np.float32), "b": np.dtype(np.float16)}, "x")


# ------------------------------------------------------------------------------------- the runner, on fakes


class FakeGpu(cuda_mod.CudaRuntime):
    """Device memory as host bytearrays; records the calls."""

    kind = "fake"

    def __init__(self):
        self.mem, self.calls, self.next = {}, [], 4096

    def _call(self, name, *args):
        self.calls.append(name)
        if name == "cudaMalloc":
            ptr, self.next = self.next, self.next + args[0] + 256
            self.mem[ptr] = bytearray(args[0])
            return (ptr,)
        if name == "cudaFree":
            del self.mem[args[0]]
        if name == "cudaMemcpyAsync":
            dst, src, n, kind, _ = args
            if kind == cuda_mod.MEMCPY_HOST_TO_DEVICE:
                self.mem[dst][:n] = ctypes.string_at(src, n)
            else:
                ctypes.memmove(dst, bytes(self.mem[src][:n]), n)
        if name == "cudaStreamCreate":
            return (77,)
        return ()

    def error_string(self, code):
        return "fake"

    def view(self, ptr, dtype, shape):
        return np.frombuffer(self.mem[ptr], dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class FakeContext:
    """``logits[i, j] = mean(image[i]) + 10 * task_id[i] + j``, computed from 'device' memory."""

    def __init__(self, gpu):
        self.gpu, self.shapes, self.addr = gpu, {}, {}

    def set_input_shape(self, name, shape):
        if name == "input" and not 1 <= shape[0] <= 8:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shapes["input"][0], 4) if name == "logits" else self.shapes[name]

    refuse_address = False

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return not self.refuse_address

    def execute_async_v3(self, stream):
        assert stream == 77
        n = self.shapes["input"][0]
        x = self.gpu.view(self.addr["input"], np.float32, self.shapes["input"])
        t = self.gpu.view(self.addr["task_id"], np.int64, (n,))
        y = x.reshape(n, -1).mean(1)[:, None] + 10 * t[:, None] + np.arange(4)[None]
        self.gpu.mem[self.addr["logits"]][: y.nbytes] = y.astype(np.float32).tobytes()
        return True


class FakeEngine:
    io = [("input", "INPUT", "FLOAT"), ("task_id", "INPUT", "INT64"), ("logits", "OUTPUT", "FLOAT")]

    def __init__(self, gpu):
        self.gpu, self.num_io_tensors = gpu, len(self.io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=next(d for n, _, d in self.io if n == name))

    def create_execution_context(self):
        return FakeContext(self.gpu)


def test_runner_call_sequence_on_a_fake_engine(monkeypatch):
    import atexport.runtime.tensorrt as trt_mod

    gpu = FakeGpu()
    fake_trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))
    sidecar = {"metadata": {"input": {"name": "input"}, "output": {"name": "logits"}},
               "profiles": [{"input": "input", "min": [1, 3, 4, 4], "max": [8, 3, 4, 4]}]}
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_mod, "load_engine",
                        lambda path, device=0, log=None: (fake_trt, object(), FakeEngine(gpu), sidecar))
    monkeypatch.setattr(cuda_mod, "cuda_runtime", lambda prefer=None: gpu)
    x = np.random.default_rng(1).standard_normal((5, 3, 4, 4)).astype(np.float32)
    ids = np.array([0, 1, 2, 1, 0])
    with TensorRTRunner("fake.engine") as r:
        assert r.inputs == {"input": np.float32, "task_id": np.int64} and r.image == "input" and r.output == "logits"
        y = r.infer(x, task_id=ids)
        y2 = r.infer(x[:2], task_id=ids[:2])  # smaller batch: buffers reused
        with pytest.raises(BadInputError, match=r"outside the engine's profile \(min \[1, 3, 4, 4\], max \[8, 3, 4, 4\]\)"):
            r.infer(np.zeros((9, 3, 4, 4), np.float32), task_id=np.zeros(9, np.int64))
        with pytest.raises(BadInputError, match="task_id"):
            r.infer(x)
        r.context.refuse_address = True  # set_tensor_address returns False: a clear error, not garbage logits
        from atexport.errors import AtexportError

        with pytest.raises(AtexportError, match="refused the GPU address of input"):
            r.infer(x, task_id=ids)
    want = x.reshape(5, -1).mean(1)[:, None] + 10 * ids[:, None] + np.arange(4)[None]
    np.testing.assert_allclose(y, want, rtol=1e-6)
    np.testing.assert_allclose(y2, want[:2], rtol=1e-6)
    assert gpu.mem == {}  # everything freed on exit
    assert gpu.calls.count("cudaMalloc") == 3 and "cudaStreamDestroy" in gpu.calls
    assert gpu.calls[0] == "cudaSetDevice"


# ------------------------------------------------------------------------------------- no torch


def test_engine_runtime_never_imports_torch(tmp_path):
    """Importing the runner and the CUDA wrapper, and every step up to TensorRT, leaves torch unimported."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine bytes")
    meta = {"backbone": {"name": "toy"}, "input": {"name": "input", "shape": ["batch", 3, 32, 32]},
            "output": {"name": "logits", "shape": ["batch", 5]},
            "preprocess": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "m.engine.json").write_text(json.dumps({
        "format": "atexport.engine", "format_version": 1, "precision": "fp16",
        "tensorrt": {"version": "10.9.0", "major": 10}, "device": {"name": "x", "compute_capability": [8, 7]},
        "engine": {"path": "m.engine", "sha256": hashlib.sha256(b"engine bytes").hexdigest()}, "metadata": meta}))
    script = textwrap.dedent(f"""
        import json, sys
        import atexport.runtime.cuda, atexport.runtime.tensorrt
        from atexport.errors import MissingDependencyError
        from atexport.runtime import load_model
        from atexport.runtime.tensorrt import cuda_device
        errors = []
        for step in (lambda: atexport.runtime.cuda.cuda_runtime().device_info(0), cuda_device,
                     lambda: atexport.runtime.tensorrt.TensorRTRunner({str(engine)!r}).activate(),
                     lambda: load_model({str(engine)!r})):
            try:
                step()
            except MissingDependencyError as e:
                errors.append(str(e))
        print(json.dumps({{"torch": "torch" in sys.modules, "errors": errors}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] is False, res
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:  # runner and load_model stop at TensorRT, in one sentence
        assert [e for e in res["errors"] if "TensorRT's Python package is not installed" in e][-2:] == res["errors"][-2:]


# ------------------------------------------------------------------------------------- backend choice, device, versions


class _Backend(cuda_mod.CudaRuntime):
    def __init__(self, kind, code=0, count=1):
        self.kind, self.source, self.code, self.count = kind, f"fake-{kind}", code, count

    def _call(self, name, *args):
        if self.code:
            self._fail(name, self.code)
        return (self.count,) if name == "cudaGetDeviceCount" else ()

    def error_string(self, code):
        return "CUDA driver version is insufficient for CUDA runtime version"


def test_cuda_python_without_driver_falls_back_to_ctypes(monkeypatch):
    """cuda-bindings 13.x on a CUDA 12 driver says 'insufficient driver'; the ctypes libcudart then finds the GPU."""
    from atexport.utils.machine import describe_machine, machine_line

    monkeypatch.setattr(cuda_mod, "_RUNTIME", None)
    monkeypatch.setattr(cuda_mod, "make_backend", lambda kind: _Backend(kind, code=35))
    monkeypatch.setattr(cuda_mod, "_ctypes_runtimes", lambda: iter([_Backend("ctypes", code=35), _Backend("ctypes")]))
    rt = cuda_mod.cuda_runtime()
    assert rt.kind == "ctypes" and cuda_mod.cuda_runtime() is rt
    info = cuda_mod.backend_info()
    assert info["backend"] == "ctypes" and "insufficient" in info["skipped"][0] and info["skipped"][0].startswith("cuda-python")
    m = describe_machine()
    assert m["cuda_backend"]["backend"] == "ctypes" and "CUDA via ctypes" in machine_line(m)


def test_no_backend_finds_a_gpu_names_each(monkeypatch):
    monkeypatch.setattr(cuda_mod, "_RUNTIME", None)
    monkeypatch.setattr(cuda_mod, "make_backend", lambda kind: _Backend(kind, code=35))
    monkeypatch.setattr(cuda_mod, "_ctypes_runtimes", lambda: iter([_Backend("ctypes", count=0)]))
    with pytest.raises(cuda_mod.NoCudaDevice) as e:
        cuda_mod.cuda_runtime()
    msg = str(e.value)
    assert "cuda-python via fake-cuda-python: CUDA driver version is insufficient" in msg
    assert "ctypes via fake-ctypes: 0 devices" in msg and "cuda-python<13" in msg
    assert cuda_mod.backend_info() is None


def _fake_load(monkeypatch, tmp_path, devices, trt_version="10.9.0"):
    """A real sidecar (Orin, TensorRT 10.9.0) and a fake TensorRT whose runtime deserializes anything."""
    import atexport.runtime.tensorrt as trt_mod
    from test_runtime import fake_engine

    meta = {"backbone": {"name": "toy"}, "input": {"name": "input", "shape": ["batch", 3, 32, 32]},
            "output": {"name": "logits", "shape": ["batch", 5]},
            "preprocess": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    engine = fake_engine(tmp_path, meta)

    class ILogger:
        Severity = SimpleNamespace(ERROR=1, WARNING=2)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return "engine"

    fake = SimpleNamespace(__version__=trt_version, ILogger=ILogger, Runtime=Runtime)
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_mod, "cuda_device", lambda index=0: devices[index])
    return engine


def test_load_engine_checks_the_runners_device(monkeypatch, tmp_path):
    from atexport.errors import IncompatibleCheckpointError
    from atexport.runtime.tensorrt import load_engine

    devices = [{"name": "NVIDIA H100", "compute_capability": [9, 0]},
               {"name": "NVIDIA Jetson Orin", "compute_capability": [8, 7]}]
    engine = _fake_load(monkeypatch, tmp_path, devices)
    assert load_engine(engine, device=1)[2] == "engine"  # GPU 1 is the one it was built for
    with pytest.raises(IncompatibleCheckpointError, match="compute capability 8.7"):
        load_engine(engine, device=0)


def test_version_mismatch_names_both_versions_and_the_pin(monkeypatch, tmp_path):
    from atexport.errors import IncompatibleCheckpointError
    from atexport.runtime.tensorrt import load_engine, version_pin_hint

    engine = _fake_load(monkeypatch, tmp_path, [{"name": "NVIDIA Jetson Orin", "compute_capability": [8, 7]}],
                        trt_version="11.1.0")
    with pytest.raises(IncompatibleCheckpointError) as e:
        load_engine(engine)
    msg = str(e.value)
    assert "TensorRT 10.9.0 (this machine has 11.1.0)" in msg and "pip install 'tensorrt-cu12==10.9.0'" in msg
    assert version_pin_hint("10.9.0", "10.9.0") == ""
