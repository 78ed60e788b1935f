"""End-to-end check of the TensorRT path on a GPU machine, in under five minutes on tiny ViTs.

    pip install -e '.[all,test]' tensorrt-cu12 'cuda-python<13'
    python bench/gpu_e2e.py [--workdir DIR] [--keep] [--no-triton]

Steps, each printed PASS / FAIL / SKIP with its numbers:

1. both CUDA backends (cuda-python, libcudart through ctypes) find the GPU;
2. an FP16 refittable engine and an INT8 engine build from tiny checkpoints, with their parity checks;
3. each engine matches ONNX Runtime on the ONNX model of the same precision at batches 1, 3 and the
   profile maximum, and refuses maximum + 1 with a clear sentence;
4. the FP16 engine refitted with task B matches ``atexport swap`` of B into the FP16 ONNX model;
5. a multi-task engine matches ONNX Runtime on a batch of mixed task ids;
6. where ``tritonserver`` exists: repositories for the ONNX model, the engine, the multi-task ONNX model
   and the multi-task engine load with ``--exit-on-error --strict-model-config=true`` and answer one
   request each.

Exit status: 0 when every step passed (SKIPs allowed), 1 on any FAIL, 4 when TensorRT or a GPU is missing
(one sentence says which). Plain Python, no pytest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = (1, 4, 8)  # optimisation profile min, opt, max
RESULTS: list[tuple[str, str, str]] = []


def record(step: str, status: str, detail: str = "") -> None:
    RESULTS.append((step, status, detail))
    print(f"[{status}] {step}{': ' + detail if detail else ''}", flush=True)


def step(name):
    """Run a step function; any exception is a FAIL with its message (the traceback goes to stderr)."""
    def wrap(fn):
        def run(*a, **k):
            try:
                detail = fn(*a, **k)
                record(name, "PASS", detail or "")
                return True
            except Skip as e:
                record(name, "SKIP", str(e))
            except Exception as e:  # noqa: BLE001 - a report, not a library
                traceback.print_exc(file=sys.stderr)
                record(name, "FAIL", f"{type(e).__name__}: {e}")
            return False
        return run
    return wrap


class Skip(Exception):
    pass


def preflight() -> str | None:
    """One sentence if TensorRT or a GPU is missing, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT's Python package is not installed; run on a GPU machine after "
                "pip install -e '.[all,test]' tensorrt-cu12 'cuda-python<13'.")
    try:
        from atexport.runtime.tensorrt import cuda_device

        cuda_device(0)
    except Exception as e:  # noqa: BLE001
        return f"no usable CUDA GPU here ({e})"
    return None


def compare(ref, cand, x, tol, feeds=None):
    a, b = ref.infer(x, **(feeds or {})), cand.infer(x, **(feeds or {}))
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(a).max()) or 1.0
    if not diff <= tol * max(1.0, scale):
        raise AssertionError(f"max |diff| {diff:.4g} > {tol} x {max(1.0, scale):.3g} at batch {len(x)}")
    return diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", type=Path, default=None, help="Where to write models [default: a temp folder].")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    ap.add_argument("--no-triton", action="store_true", help="Skip the Triton step.")
    args = ap.parse_args(argv)
    why = preflight()
    if why:
        print(f"gpu_e2e: cannot run here: {why}", file=sys.stderr)
        return 4
    sys.path.insert(0, str(ROOT / "tests"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="atexport-gpu-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        run_steps(work, triton=not args.no_triton)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} steps passed or skipped, {len(failed)} failed "
          f"in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


def run_steps(work: Path, triton: bool) -> None:
    from _helpers import make_checkpoint

    from atexport.errors import BadInputError
    from atexport.export.tensorrt import EngineOptions, Int8Options, export_tensorrt, refit_engine
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.tensorrt import TensorRTRunner

    state: dict = {}

    @step("1. both CUDA backends find the GPU")
    def backends():
        from atexport.runtime import cuda

        found = {}
        found["cuda-python"] = cuda.cuda_runtime("cuda-python").device_info(0)["name"]
        ok = [rt for rt in cuda._ctypes_runtimes() if _has_gpu(rt)]
        if not ok:
            raise AssertionError("no libcudart found by the ctypes backend sees the GPU")
        found["ctypes"] = f"{ok[0].device_info(0)['name']} via {ok[0].source}"
        return json.dumps(found)

    backends()
    ckpt_a = make_checkpoint(work / "task_a.pt", num_classes=5, weight_seed=1)
    ckpt_b = make_checkpoint(work / "task_b.pt", num_classes=5, weight_seed=2)

    @step("2a. FP16 refittable engine builds with parity")
    def fp16():
        res = export_tensorrt(ckpt=ckpt_a, precision="fp16",
                              engine=EngineOptions(refit=True, batch=",".join(map(str, BATCH)),
                                                   output=work / "a.fp16.engine"))
        assert res.engine and res.parity and all(r.passed for r in res.parity), "parity rows failed"
        state["fp16"] = res
        return f"{len(res.parity)} parity rows passed, {res.engine.seconds['build']:.1f} s"

    @step("2b. INT8 engine builds with parity")
    def int8():
        res = export_tensorrt(ckpt=ckpt_a, precision="int8", int8=Int8Options(calib="digits", count=64),
                              engine=EngineOptions(batch=",".join(map(str, BATCH)), output=work / "a.int8.engine"))
        assert res.engine and res.parity and all(r.passed for r in res.parity), "parity rows failed"
        state["int8"] = res
        return f"{len(res.parity)} parity rows passed"

    fp16()
    int8()
    x_all = np.random.default_rng(0).standard_normal((BATCH[2] + 1, 3, 32, 32)).astype(np.float32)
    for key, tol in (("fp16", 2e-2), ("int8", 5e-2)):
        @step(f"3. {key} engine = ORT on the {key} ONNX at batches 1, 3, {BATCH[2]}; refuses {BATCH[2] + 1}")
        def engine_vs_ort(key=key, tol=tol):
            res = state.get(key)
            if res is None:
                raise Skip("no engine (its build failed)")
            diffs = []
            with OnnxRuntimeRunner(str(res.precision_onnx)) as ref, TensorRTRunner(res.engine.path) as cand:
                for b in (1, 3, BATCH[2]):
                    diffs.append(compare(ref, cand, x_all[:b], tol))
                try:
                    cand.infer(x_all)
                except BadInputError as e:
                    assert "outside the engine's profile" in str(e), str(e)
                else:
                    raise AssertionError(f"batch {BATCH[2] + 1} was not refused")
            return "max |diff| " + ", ".join(f"{d:.3g}" for d in diffs)

        engine_vs_ort()

    @step("4. FP16 engine refitted with task B = 'atexport swap' of B in ORT")
    def refit():
        from atexport.export.swap import swap_onnx

        res = state.get("fp16")
        if res is None:
            raise Skip("no FP16 engine")
        out = refit_engine(res.engine.path, ckpt_b, work / "b.fp16.engine")
        assert out.parity and all(r.passed for r in out.parity), "refit parity failed"
        swapped = swap_onnx(res.precision_onnx, ckpt_b, work / "b.fp16.onnx").path
        with OnnxRuntimeRunner(str(swapped)) as ref, TensorRTRunner(out.path) as cand:
            d = compare(ref, cand, x_all[:4], 2e-2)
        return f"{out.refitted} tensors refitted in {out.seconds['refit'] * 1000:.0f} ms, max |diff| {d:.3g}"

    refit()

    @step("5. multi-task engine with mixed task_id = ORT")
    def multitask():
        from atexport.export.multitask import export_multitask
        from atexport.export.settings import ExportSettings

        mt = export_multitask([ckpt_a, ckpt_b], work / "tasks.onnx", ExportSettings(verify=False)).path
        res = export_tensorrt(mt, precision="fp16",
                              engine=EngineOptions(batch=",".join(map(str, BATCH)), output=work / "tasks.fp16.engine"))
        assert res.parity and all(r.passed for r in res.parity), "multi-task parity failed"
        state["mt_onnx"], state["mt_engine"] = mt, res.engine.path
        ids = np.array([0, 1, 1, 0, 1, 0, 0], dtype=np.int64)
        with OnnxRuntimeRunner(str(res.precision_onnx)) as ref, TensorRTRunner(res.engine.path) as cand:
            d = compare(ref, cand, x_all[:7], 2e-2, feeds={"task_id": ids})
        return f"max |diff| {d:.3g} on task ids {ids.tolist()}"

    multitask()
    if not triton:
        record("6. Triton repositories load and answer", "SKIP", "--no-triton")
        return
    binary = shutil.which("tritonserver")
    if binary is None:
        record("6. Triton repositories load and answer", "SKIP", "no tritonserver binary here")
        return
    models = {"onnx": state.get("fp16") and state["fp16"].onnx_path, "engine": state.get("fp16") and state["fp16"].engine.path,
              "mt_onnx": state.get("mt_onnx"), "mt_engine": state.get("mt_engine")}
    for name, model in models.items():
        @step(f"6. Triton: {name} repository loads (strict config) and answers one request")
        def serve(name=name, model=model):
            if model is None:
                raise Skip("its model was not made")
            return triton_round_trip(binary, Path(model), work / f"repo_{name}", name)

        serve()


def _has_gpu(rt) -> bool:
    try:
        return rt.device_count() > 0
    except Exception:  # noqa: BLE001
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def triton_round_trip(binary: str, model: Path, repo: Path, name: str) -> str:
    from atexport.deploy import write_triton_repo

    entry = write_triton_repo(model, repo, name=name, force=True)
    port = _free_port()
    log = open(repo / "tritonserver.log", "w")
    proc = subprocess.Popen([binary, f"--model-repository={repo}", "--exit-on-error=true",
                             "--strict-model-config=true", f"--http-port={port}", "--grpc-port=0",
                             "--metrics-port=0", "--allow-grpc=false", "--allow-metrics=false"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"tritonserver exited ({proc.returncode}); see {repo / 'tritonserver.log'}")
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("tritonserver was not ready within 120 s")
        cfg = entry.config
        fixed = cfg["max_batch_size"] == 0
        inputs = []
        for i in cfg["input"]:
            dims = list(i["dims"]) if fixed else [2, *i["dims"]]
            if i.get("reshape") is not None and not fixed:
                dims = [2, 1]
            n = int(np.prod(dims))
            data = [0] * n if i["data_type"] == "TYPE_INT64" else np.random.default_rng(0).standard_normal(n).tolist()
            inputs.append({"name": i["name"], "shape": dims, "datatype": i["data_type"].replace("TYPE_", ""),
                           "data": data})
        body = json.dumps({"inputs": inputs}).encode()
        req = urllib.request.Request(f"{url}/v2/models/{name}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        shape = out["outputs"][0]["shape"]
        return f"answered, output {out['outputs'][0]['name']} {shape}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
