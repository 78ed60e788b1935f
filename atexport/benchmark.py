"""``atexport bench``: latency and throughput of every backend, precision and batch size, with its baseline.

:func:`benchmark` runs the checkpoint's PyTorch model (eager, and ``torch.compile`` when asked) and every
given artifact through the common :class:`~atexport.runtime.base.Runner` interface on the same seeded
input, ``warmup`` untimed calls then ``runs`` timed ones per (backend, batch size), and reports p50 / p90 /
p99 latency, mean, throughput, and the speed-up over PyTorch eager at the same batch on the same device,
with the machine described (:func:`describe_machine`: CPU model and cores, memory, GPU, library versions).
The input is already preprocessed (what trtexec and Polygraphy time); decoding and resizing are not
included. TensorRT timings include the host-device copies of the input and logits, as an app sees them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from atexport.errors import AtexportError, BadInputError

BENCH_FORMAT = "atexport.bench"
BENCH_VERSION = 1
_LIBRARIES = ("atexport", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "timm", "tensorrt")


# --------------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[dict]:
    """GPUs from nvidia-smi (no CUDA library is loaded); Jetson boards report through /proc/device-tree."""
    out = []
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        )
        for line in res.stdout.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3:
                out.append({"name": parts[0], "memory_mb": parts[1], "driver": parts[2]})
    except (OSError, subprocess.SubprocessError):
        pass
    if not out and Path("/proc/device-tree/model").is_file():
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
        if "jetson" in model.lower() or "nvidia" in model.lower():
            out.append({"name": model})
    return out


def library_versions(names: Sequence[str] = _LIBRARIES) -> dict[str, str]:
    """Installed versions (from package metadata: nothing is imported)."""
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    for dist in ("tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"):
        if "tensorrt" not in out:
            try:
                out["tensorrt"] = md.version(dist)
            except md.PackageNotFoundError:
                continue
    return out


def describe_machine() -> dict:
    """CPU model, cores, memory, GPUs, OS, Python and library versions, date: what a figure needs beside it."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gb": _memory_gb(),
        "gpus": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(m: Mapping) -> str:
    """One line for terminals and reports."""
    gpus = ", ".join(g.get("name", "?") for g in m.get("gpus") or []) or "no GPU"
    libs = ", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items())
    mem = f", {m['memory_gb']} GB" if m.get("memory_gb") else ""
    return f"{m.get('cpu')} ({m.get('cores_usable')} of {m.get('cores')} cores{mem}), {gpus}; Python {m.get('python')}; {libs}"


# --------------------------------------------------------------------------------------------------
# Timing


@dataclass
class BenchRow:
    """Latency of one (backend, precision, device, batch size).

    Attributes:
        latency_ms: ``{"p50", "p90", "p99", "mean", "min", "max"}`` over the timed runs.
        throughput: images per second (``batch / mean latency``).
        speedup: PyTorch eager's mean latency over this row's, at the same batch on the same device.
    """

    name: str
    backend: str
    precision: str
    device: str
    batch: int
    runs: int
    warmup: int
    latency_ms: dict
    throughput: float
    path: str | None = None
    speedup: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchResult:
    """All rows, the machine and the settings; ``to_dict`` is the JSON written by ``--json``."""

    rows: list[BenchRow]
    machine: dict
    config: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": BENCH_FORMAT, "format_version": BENCH_VERSION, "machine": self.machine,
                "config": self.config, "rows": [r.to_dict() for r in self.rows], "notes": self.notes}

    def table(self) -> str:
        head = (f"{'backend':<28} {'device':<6} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
                f"{'img/s':>9} {'vs eager':>9}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            sp = f"{r.speedup:.2f}x" if r.speedup else "-"
            lat = r.latency_ms
            lines.append(f"{r.name:<28} {r.device:<6} {r.batch:>5} {lat['p50']:>9.2f} {lat['p90']:>9.2f} "
                         f"{lat['p99']:>9.2f} {r.throughput:>9.1f} {sp:>9}")
        return "\n".join(lines)


def time_runner(runner, x: np.ndarray, runs: int, warmup: int, sync=None) -> np.ndarray:
    """Latencies in ms of ``runs`` calls of ``runner.infer(x)`` after ``warmup`` untimed calls."""
    for _ in range(int(warmup)):
        runner.infer(x)
    if sync:
        sync()
    lat = np.empty(int(runs))
    for k in range(int(runs)):
        t0 = time.perf_counter()
        runner.infer(x)  # returns host numpy arrays: GPU work is complete when it returns
        if sync:
            sync()
        lat[k] = (time.perf_counter() - t0) * 1000.0
    return lat


def _stats(lat: np.ndarray) -> dict:
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(lat.mean()),
            "min": float(lat.min()), "max": float(lat.max())}


def parse_batches(text) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (CLI ``--batch``)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        out = [int(t) for t in items]
    except ValueError:
        raise BadInputError(f"--batch {text}: expected batch sizes separated by commas, e.g. 1,8.") from None
    if not out or any(b < 1 for b in out):
        raise BadInputError(f"--batch {text}: batch sizes must be positive integers.")
    return list(dict.fromkeys(out))


def _ort_device(providers) -> str:
    return "cuda" if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers or []) else "cpu"


def benchmark(
    ckpt,
    *,
    onnx=None,
    onnx_fp16=None,
    onnx_int8=None,
    engine=None,
    batches: Sequence[int] | str = (1, 8),
    runs: int = 50,
    warmup: int = 10,
    torch_compile: bool = False,
    torch_device: str | None = None,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    backbone_weights=None,
    seed: int = 0,
    output_json: str | os.PathLike | None = None,
    log=None,
) -> BenchResult:
    """Time PyTorch (eager, optionally ``torch.compile``) and every artifact at each batch size.

    Args:
        ckpt: the checkpoint the artifacts were made from (its PyTorch model is the baseline).
        onnx, onnx_fp16, onnx_int8, engine: artifacts (paths or lists of paths).
        batches: batch sizes (``"1,8"`` or a list); fixed-batch artifacts run at their own only, engines
            within their optimisation profile.
        runs: timed calls per row.
        warmup: untimed calls before them (also where ``torch.compile`` compiles).
        torch_compile: also time ``torch.compile(model)``.
        torch_device: device of the PyTorch baseline (default: CPU, plus CUDA when an engine or a GPU
            execution provider is timed and CUDA is available).
        threads: threads of ONNX Runtime *and* PyTorch (default: each library's own, all cores); on a
            shared machine, PyTorch with more threads than free cores slows down by orders of magnitude.
        providers: ONNX Runtime execution providers (default CPU).
        backbone_weights: local backbone weights for the checkpoint.
        seed: seed of the random input.
        output_json: write the result there (atomically).
        log: optional callable receiving progress lines.
    """
    from atexport.checkpoint import Checkpoint, build_model, load_checkpoint
    from atexport.verify.verify import artifacts, load_artifact

    say = log or (lambda *_: None)
    sizes = parse_batches(batches)
    if int(runs) < 1:
        raise BadInputError(f"--runs {runs}: must be at least 1.")
    if int(warmup) < 0:
        raise BadInputError(f"--warmup {warmup}: must be 0 or more.")
    if output_json is not None:
        from atexport.utils.io import check_writable

        check_writable(output_json, "--json")
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    loaded = [load_artifact(a, ckpt, threads, providers) for a in artifacts(onnx, onnx_fp16, onnx_int8, engine)]
    import torch

    devices = [torch_device] if torch_device else ["cpu"]
    wants_gpu = any(i.backend == "tensorrt" for i in loaded) or _ort_device(providers) == "cuda"
    if torch_device is None and wants_gpu and torch.cuda.is_available():
        devices.append("cuda")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        raise BadInputError(f"--torch-device {torch_device}: CUDA is not available to PyTorch on this machine.")
    model = build_model(ckpt, backbone_weights=backbone_weights)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))  # same thread count for every backend; restored below
    try:
        return _run_benchmark(model, ckpt, loaded, devices, sizes, runs, warmup, torch_compile, threads, providers,
                              seed, output_json, say)
    finally:
        torch.set_num_threads(prev_threads)


def _run_benchmark(model, ckpt, loaded, devices, sizes, runs, warmup, torch_compile, threads, providers, seed,
                   output_json, say) -> BenchResult:
    import torch

    from atexport.runtime.torch import TorchRunner

    shape = [int(v) for v in ckpt.preprocess["input_size"]]
    rng = np.random.default_rng(seed)
    notes, rows = [], []
    config = {"checkpoint": str(ckpt.path), "backbone": ckpt.model.backbone, "input": shape, "batches": sizes,
              "runs": int(runs), "warmup": int(warmup), "threads": threads, "providers": list(providers or ["CPUExecutionProvider"]),
              "torch_threads": torch.get_num_threads(), "torch_compile": bool(torch_compile),
              "input_kind": "seeded standard-normal, already preprocessed"}
    inputs = {b: rng.standard_normal((b, *shape)).astype(np.float32) for b in sizes}

    def add(name, backend, precision, device, runner, b, path=None, sync=None):
        say(f"timing {name} on {device} at batch {b} ...")
        lat = time_runner(runner, inputs[b], runs, warmup, sync)
        st = _stats(lat)
        rows.append(BenchRow(name, backend, precision, device, b, int(runs), int(warmup), st,
                             b / (st["mean"] / 1000.0), path))

    for device in devices:
        sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else None
        dev_model = model.to(device)
        with TorchRunner(dev_model, device=device, name="pytorch") as r:
            for b in sizes:
                add("pytorch eager fp32", "pytorch", "fp32", device.split(":")[0], r, b, sync=sync)
        if torch_compile:
            try:
                compiled = torch.compile(dev_model)
            except Exception as e:  # pragma: no cover - depends on the platform's compiler
                raise AtexportError(f"torch.compile failed on {device}: {str(e).splitlines()[0][:200]}") from None
            with TorchRunner(compiled, device=device, name="pytorch-compile") as r:
                for b in sizes:
                    try:
                        add("pytorch compile fp32", "pytorch-compile", "fp32", device.split(":")[0], r, b, sync=sync)
                    except Exception as e:
                        raise AtexportError(
                            f"torch.compile could not compile the model on {device} (batch {b}): "
                            f"{str(e).strip().splitlines()[0][:300]}. Run without --torch-compile, or install "
                            "a C++ compiler (inductor needs one on CPU)."
                        ) from None
    model.to("cpu")
    for i in loaded:
        device = "cuda" if i.backend == "tensorrt" else _ort_device(providers)
        with i.runner as r:
            for b in sizes:
                if i.batch and i.backend == "onnxruntime" and b != i.batch:
                    notes.append(f"{i.artifact.path}: fixed batch {i.batch}; batch {b} skipped.")
                    continue
                if i.batch and i.backend == "tensorrt" and b > i.batch:
                    notes.append(f"{i.artifact.path}: batch {b} is above the engine profile's maximum {i.batch}; skipped.")
                    continue
                add(f"{i.backend} {i.precision}", i.backend, i.precision, device, r, b, str(i.artifact.path))
            for b in sorted({i.batch} - set(sizes)) if i.batch and i.backend == "onnxruntime" else []:
                inputs.setdefault(b, rng.standard_normal((b, *shape)).astype(np.float32))
                add(f"{i.backend} {i.precision}", i.backend, i.precision, device, r, b, str(i.artifact.path))
    eager = {(r.device, r.batch): r.latency_ms["mean"] for r in rows if r.backend == "pytorch"}
    for r in rows:
        base = eager.get((r.device, r.batch))
        r.speedup = base / r.latency_ms["mean"] if base else None
    result = BenchResult(rows=rows, machine=describe_machine(), config=config, notes=notes)
    if output_json is not None:
        from atexport.utils.io import atomic_write_json

        atomic_write_json(output_json, result.to_dict())
    return result
