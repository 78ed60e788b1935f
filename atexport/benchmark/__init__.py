"""``atexport bench``: latency and throughput of every backend, precision and batch size, with its baseline.

:func:`benchmark` runs the checkpoint's PyTorch model (eager, and ``torch.compile`` when asked) and every
given artifact through the common :class:`~atexport.runtime.base.Runner` interface on the same seeded
input, ``warmup`` untimed calls then ``runs`` timed ones per (backend, batch size), and reports p50 / p90 /
p99 latency, mean, throughput, and the speed-up over PyTorch eager at the same batch on the same device,
with the machine described (:func:`describe_machine`: CPU model and cores, memory, GPU, library versions).
The input is already preprocessed (what trtexec and Polygraphy time); decoding and resizing are not
included. Multi-task models are timed on one task (``task``) against that task's PyTorch model, or on
mixed-task batches (``mixed``) against every task's PyTorch model run on its share, one after another.
TensorRT timings include the host-device copies of the input and logits, as an app sees them.

On the CPU every ONNX artifact is also timed in OpenVINO when it is installed (:func:`openvino_artifacts`):
FP32 and, where the CPU has AMX or AVX512-BF16, BF16 for a float file; INT8 and INT8 with BF16 float ops for
a Q/DQ file; and PyTorch eager runs once more under BF16 autocast where the CPU has AMX. Every row names the
precision that ran, all in one run and one table (issue #13).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from atexport.errors import AtexportError, BadInputError
from atexport.utils.machine import describe_machine
from atexport.benchmark.tasks import TaskPlan, _TasksOneByOne, task_plan  # noqa: F401 (re-exported)
from atexport.runtime.tasks import TaskRunner

BENCH_FORMAT = "atexport.bench"
BENCH_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Timing


@dataclass
class BenchRow:
    """Latency of one (backend, precision, device, batch size).

    Attributes:
        latency_ms: ``{"p50", "p90", "p99", "mean", "min", "max"}`` over the timed runs.
        throughput: images per second (``batch / mean latency``).
        speedup: PyTorch eager's mean latency over this row's, at the same batch on the same device.
        task: multi-task models: the task timed, or ``"mixed"`` for mixed-task batches.
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
    task: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["task"] is None:  # single-task models: the JSON is as it was
            del d["task"]
        return d


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
        w = max([28, *[len(r.name) for r in self.rows]])
        head = (f"{'backend':<{w}} {'device':<6} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
                f"{'img/s':>9} {'vs eager':>9}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            sp = f"{r.speedup:.2f}x" if r.speedup else "-"
            lat = r.latency_ms
            lines.append(f"{r.name:<{w}} {r.device:<6} {r.batch:>5} {lat['p50']:>9.2f} {lat['p90']:>9.2f} "
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


def _many(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def cpu_has_bf16() -> bool:
    """Whether this CPU runs BF16 natively (AMX or AVX512-BF16): where OpenVINO's BF16 rows are timed."""
    from atexport.utils.machine import cpu_flags, has_amx

    return has_amx() or "avx512_bf16" in cpu_flags()


def openvino_artifacts(loaded, threads=None, want: bool | None = None, notes: list | None = None) -> list:
    """The OpenVINO rows of every ONNX artifact timed in ONNX Runtime: one loaded artifact per precision.

    A float file runs in ``fp32`` and, on a CPU with BF16 (:func:`cpu_has_bf16`), ``bf16``; a Q/DQ (INT8)
    file in ``int8`` and ``int8+bf16``. Each runner is compiled here (at its precision) and labelled with
    what it runs.

    Args:
        loaded: the artifacts (:class:`~atexport.runtime.artifacts.LoadedArtifact`) already read.
        threads: OpenVINO inference threads.
        want: ``None``: when openvino is installed; ``True``: required (MissingDependencyError without it);
            ``False``: none.
        notes: a list that receives a line saying why rows were left out.
    """
    import importlib.util

    from atexport.runtime.artifacts import Artifact, read_artifact

    notes = notes if notes is not None else []
    onnx = [i for i in loaded if i.backend == "onnxruntime"]
    if want is False or not onnx:
        return []
    if want is None and importlib.util.find_spec("openvino") is None:
        notes.append("OpenVINO rows left out: openvino is not installed (pip install 'atexport[openvino]').")
        return []
    bf16 = cpu_has_bf16()
    if not bf16:
        notes.append("OpenVINO BF16 rows left out: this CPU has neither AMX nor AVX512-BF16.")
    out = []
    for i in onnx:
        wanted = ["int8", "int8+bf16"] if i.meta.precision == "int8" else ["fp32", "bf16"]
        for precision in wanted if bf16 else wanted[:1]:
            a = Artifact(i.artifact.path, i.artifact.flag, precision, "openvino")
            out.append(read_artifact(a, threads))
    return out


@dataclass(frozen=True)
class BenchSettings:
    """How to time: made once, checked here (``batches`` parsed to a tuple of sizes).

    Attributes:
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
        openvino: also time every ONNX artifact in OpenVINO (:func:`openvino_artifacts`): ``None`` when
            openvino is installed, ``True`` required, ``False`` never.
        backbone_weights: local backbone weights for the checkpoint.
        seed: seed of the random input.
        task: multi-task models: the task to time (default: the one task of a single checkpoint).
        mixed: multi-task models: time mixed-task batches of the checkpoints' tasks.
    """

    batches: Sequence[int] | str = (1, 8)
    runs: int = 50
    warmup: int = 10
    torch_compile: bool = False
    torch_device: str | None = None
    threads: int | None = None
    providers: Sequence[str] | None = None
    openvino: bool | None = None
    backbone_weights: str | os.PathLike | None = None
    seed: int = 0
    task: str | None = None
    mixed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "batches", tuple(parse_batches(self.batches)))
        if int(self.runs) < 1:
            raise BadInputError(f"--runs {self.runs}: must be at least 1.")
        if int(self.warmup) < 0:
            raise BadInputError(f"--warmup {self.warmup}: must be 0 or more.")

    @property
    def sizes(self) -> list[int]:
        return list(self.batches)


def benchmark(ckpt, *, onnx=None, onnx_fp16=None, onnx_int8=None, engine=None, litert=None, executorch=None,
              settings: BenchSettings | None = None, output_json: str | os.PathLike | None = None,
              log=None) -> BenchResult:
    """Time PyTorch (eager, optionally ``torch.compile``) and every artifact at each batch size::

        res = benchmark("run.pt", onnx="model.onnx", settings=BenchSettings(batches="1,8", runs=100))
        print(res.table())

    Multi-task models (``atexport onnx --multitask``) are timed on one task (``settings.task``; every sample
    given it), against that task's own PyTorch model, or on mixed batches (``settings.mixed``: task ids
    interleaved ``0 1 2 0 1 2 ...`` over the given checkpoints' tasks), against each task's PyTorch model run on
    its share of the batch, one after another (what serving the tasks without a multi-task model costs).

    Args:
        ckpt: the checkpoint the artifacts were made from (its PyTorch model is the baseline); for
            multi-task models, a list: the checkpoints of the tasks to time.
        onnx, onnx_fp16, onnx_int8, engine: artifacts (paths or lists of paths); an OpenVINO ``.xml`` IR
            given as ``onnx`` runs in OpenVINO at its own precision.
        litert, executorch: on-device artifacts (``.tflite`` / ``.pte``, sidecars beside them): timed at batch
            1 only (what they take; larger batches are noted and skipped).
        settings: how to time (:class:`BenchSettings`; default: its defaults).
        output_json: write the result there (atomically).
        log: optional callable receiving progress lines.
    """
    from atexport.checkpoint import Checkpoint, build_model, load_checkpoint
    from atexport.runtime.artifacts import artifacts

    s = settings or BenchSettings()
    say = log or (lambda *_: None)
    if output_json is not None:
        from atexport.utils.io import check_writable

        check_writable(output_json, "--json")
    ckpts = [ck if isinstance(ck, Checkpoint) else load_checkpoint(ck) for ck in _many(ckpt)]
    if not ckpts:
        raise BadInputError("give the checkpoint the artifacts were made from (--ckpt).")
    items = artifacts(onnx, onnx_fp16, onnx_int8, engine, litert=litert, executorch=executorch)
    loaded, plan, notes = _read_for_bench(items, ckpts, s)
    import torch

    devices = _torch_devices(s, loaded)
    baseline = ckpts if plan is None else [ckpts[p] for p in plan.positions]
    models = [build_model(ck, backbone_weights=s.backbone_weights) for ck in baseline]
    prev_threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(int(s.threads))  # same thread count for every backend; restored below
    try:
        result = _run_benchmark(_Bench(models, baseline, loaded, devices, s, plan, notes, say))
    finally:
        torch.set_num_threads(prev_threads)
    if output_json is not None:
        from atexport.utils.io import atomic_write_json

        atomic_write_json(output_json, result.to_dict())
    return result


def _read_for_bench(items, ckpts, s: BenchSettings) -> tuple[list, TaskPlan | None, list[str]]:
    """The artifacts read (plus their OpenVINO rows), the multi-task plan (or ``None``), and notes; refuses
    a mix of single- and multi-task models, and artifacts not exported from the checkpoint."""
    from atexport.artifact.fit import check_exported_from
    from atexport.runtime.artifacts import read_artifact

    loaded = [read_artifact(a, s.threads, s.providers) for a in items]
    notes: list[str] = []
    loaded += openvino_artifacts(loaded, s.threads, s.openvino, notes)
    multi = [i for i in loaded if i.meta.tasks]
    if multi:
        if len(multi) != len(loaded):
            single = [str(i.artifact.path) for i in loaded if not i.meta.tasks]
            raise BadInputError(f"{', '.join(single)}: single-task, and {multi[0].artifact.path} multi-task; "
                                "time them in separate runs.")
        return loaded, task_plan(loaded, ckpts, s.task, s.mixed), notes
    if s.task is not None or s.mixed:
        flag = "--mixed" if s.mixed else f"--task {s.task}"
        raise BadInputError(f"{flag}: for multi-task models (atexport onnx --multitask); "
                            f"{'no model was given' if not loaded else 'the models given are single-task'}.")
    if len(ckpts) != 1:
        raise BadInputError(f"{len(ckpts)} checkpoints (--ckpt): several are for multi-task models (one per task); "
                            "time a single-task model with the one checkpoint it was made from.")
    for i in loaded:
        check_exported_from(i.meta, ckpts[0].task_weights(), f"{i.artifact.flag} {i.artifact.path}")
    return loaded, None, notes


def _torch_devices(s: BenchSettings, loaded) -> list[str]:
    """Devices of the PyTorch baseline: ``torch_device``, else CPU plus CUDA where an artifact runs there."""
    import torch

    devices = [s.torch_device] if s.torch_device else ["cpu"]
    wants_gpu = any(_device(i, s.providers) == "cuda" for i in loaded) or _ort_device(s.providers) == "cuda"
    if s.torch_device is None and wants_gpu and torch.cuda.is_available():
        devices.append("cuda")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        raise BadInputError(f"--torch-device {s.torch_device}: CUDA is not available to PyTorch on this machine.")
    return devices


def _device(item, providers) -> str:
    """Where an artifact runs (its backend row's device; ONNX Runtime: where its providers run)."""
    from atexport.runtime.backends import BACKENDS

    return BACKENDS[item.backend].device or _ort_device(providers)


# Bytes per input value a timed batch costs: its float64 draw and float32 copy, and activations of a ViT
# (tokens x width per block, attention maps) that are at least a few dozen times the image itself.
BENCH_BYTES_PER_VALUE = 64


def check_batch_memory(sizes, shape) -> None:
    """Refuse, before allocating, batch sizes whose inputs and activations cannot fit this machine's memory."""
    from atexport.utils.machine import check_memory

    per_image = int(np.prod([int(v) for v in shape])) * BENCH_BYTES_PER_VALUE
    b = max(int(v) for v in sizes)
    check_memory(b * per_image, f"--batch {b}: a batch of {b:,} images of {'x'.join(map(str, shape))}",
                 "use a smaller --batch")


@dataclass
class _Bench:
    """One benchmark run: what is timed, how, and the rows and notes gathered."""

    models: list
    ckpts: list
    loaded: list
    devices: list[str]
    settings: BenchSettings
    plan: TaskPlan | None
    notes: list[str]
    say: object
    rows: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.notes = list(self.notes or [])
        self.shape = [int(v) for v in self.ckpts[0].preprocess["input_size"]]
        self.rng = np.random.default_rng(self.settings.seed)
        self.label = "" if self.plan is None else self.plan.label

    def input(self, b: int) -> np.ndarray:
        """The seeded input batch of size ``b`` (drawn once)."""
        if b not in self.inputs:
            self.inputs[b] = self.rng.standard_normal((b, *self.shape)).astype(np.float32)
        return self.inputs[b]

    def add(self, what: tuple, device: str, runner, b: int, path=None, sync=None) -> None:
        """Time ``runner`` at batch ``b``; ``what`` is ``(row name, backend, precision)``."""
        name, backend, precision = what
        s = self.settings
        self.say(f"timing {name} on {device} at batch {b} ...")
        st = _stats(time_runner(runner, self.input(b), s.runs, s.warmup, sync))
        self.rows.append(BenchRow(name, backend, precision, device, b, int(s.runs), int(s.warmup), st,
                                  b / (st["mean"] / 1000.0), path,
                                  task=None if self.plan is None else self.plan.row_task))


def _bench_config(bench: _Bench, autocast: bool) -> dict:
    """The settings recorded in the result (``config`` of the JSON)."""
    import torch

    s, ckpt, plan = bench.settings, bench.ckpts[0], bench.plan
    config = {"checkpoint": str(ckpt.path), "backbone": ckpt.model.backbone, "input": bench.shape,
              "batches": s.sizes, "runs": int(s.runs), "warmup": int(s.warmup), "threads": s.threads,
              "providers": list(s.providers or ["CPUExecutionProvider"]), "torch_threads": torch.get_num_threads(),
              "torch_compile": bool(s.torch_compile),
              "openvino": sorted({i.precision for i in bench.loaded if i.backend == "openvino"}),
              "torch_bf16_autocast": autocast, "input_kind": "seeded standard-normal, already preprocessed"}
    if plan is not None:
        config["checkpoint"] = [str(ck.path) for ck in bench.ckpts]
        config["multitask"] = plan.to_dict()
    return config


def _torch_rows(bench: _Bench, mods, device: str, what: tuple, sync, dtype=None) -> None:
    """Rows of PyTorch models on ``device`` (a mixed-task batch: each task's model on its share, in turn)."""
    from atexport.artifact.bank import PAD_LOGIT
    from atexport.runtime.torch import TorchRunner

    name, backend = what
    runners = [TorchRunner(m, device=device, dtype=dtype, name=backend) for m in mods]
    row = (name + bench.label, backend, "fp32" if dtype is None else "bf16")
    for b in bench.settings.sizes:
        r = runners[0] if len(runners) == 1 else _TasksOneByOne(runners, bench.plan.ids(b), PAD_LOGIT)
        with r:
            if backend != "pytorch-compile":
                bench.add(row, device.split(":")[0], r, b, sync=sync)
                continue
            try:
                bench.add(row, device.split(":")[0], r, b, sync=sync)
            except Exception as e:
                raise AtexportError(
                    f"torch.compile could not compile the model on {device} (batch {b}): "
                    f"{str(e).strip().splitlines()[0][:300]}. Run without --torch-compile, or install "
                    "a C++ compiler (inductor needs one on CPU)."
                ) from None


def _pytorch_rows(bench: _Bench, autocast: bool) -> None:
    """PyTorch eager (and BF16 autocast on AMX CPUs, and ``torch.compile`` when asked) on every device."""
    import torch

    for device in bench.devices:
        sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else None
        dev_models = [m.to(device) for m in bench.models]
        _torch_rows(bench, dev_models, device, ("pytorch eager fp32", "pytorch"), sync)
        if autocast and device == "cpu":
            _torch_rows(bench, dev_models, device, ("pytorch eager bf16 autocast", "pytorch-bf16"), sync,
                        torch.bfloat16)
        if bench.settings.torch_compile:
            try:
                compiled = [torch.compile(m) for m in dev_models]
            except Exception as e:  # pragma: no cover - depends on the platform's compiler
                raise AtexportError(f"torch.compile failed on {device}: {str(e).splitlines()[0][:200]}") from None
            _torch_rows(bench, compiled, device, ("pytorch compile fp32", "pytorch-compile"), sync)
    for m in bench.models:
        m.to("cpu")


def _skip_reason(i, b: int) -> str | None:
    """Why artifact ``i`` is not timed at batch ``b`` (``None``: it is), from its backend row and batch."""
    from atexport.runtime.backends import BACKENDS

    if BACKENDS[i.backend].batch_one and b != 1:
        return f"{i.artifact.path}: an on-device model takes batch 1; batch {b} skipped."
    if i.pads and b != i.batch:
        return f"{i.artifact.path}: fixed batch {i.batch}; batch {b} skipped."
    if i.batch and not i.pads and b > i.batch:
        return f"{i.artifact.path}: batch {b} is above the engine profile's maximum {i.batch}; skipped."
    return None


def _artifact_rows(bench: _Bench) -> None:
    """Every artifact at every batch it takes (a fixed-batch one also at its own batch)."""
    plan, sizes = bench.plan, bench.settings.sizes

    def feed(i, r, b):
        if plan is None:
            return r
        ids = np.asarray(plan.indices[id(i)], dtype=np.int64)[plan.ids(b)]
        return TaskRunner(r, ids, input_name=plan.input_names[id(i)], name=getattr(r, "name", "runner"))

    names = [f"{i.backend} {i.precision}" for i in bench.loaded]
    for k, i in enumerate(bench.loaded):
        device = _device(i, bench.settings.providers)
        name = names[k] + (f" ({i.artifact.path.name})" if names.count(names[k]) > 1 else "") + bench.label
        what = (name, i.backend, i.precision)
        with i.runner as r:
            for b in sizes:
                reason = _skip_reason(i, b)
                if reason:
                    bench.notes.append(reason)
                    continue
                bench.add(what, device, feed(i, r, b), b, str(i.artifact.path))
            for b in sorted({i.batch} - set(sizes)) if i.pads else []:
                bench.add(what, device, feed(i, r, b), b, str(i.artifact.path))


def _run_benchmark(bench: _Bench) -> BenchResult:
    """Time PyTorch, then every artifact; each row's speed-up over PyTorch eager at its batch and device."""
    from atexport.utils.machine import has_amx

    autocast = has_amx()  # PyTorch's BF16 autocast is fast only with AMX: the reference row for OpenVINO's BF16
    config = _bench_config(bench, autocast)
    sizes, plan = bench.settings.sizes, bench.plan
    if plan is not None and plan.mode == "mixed" and min(sizes) < len(plan.names):
        bench.notes.append(f"batch {min(sizes)} holds fewer samples than the {len(plan.names)} tasks: its batches mix "
                           f"only the first {min(sizes)} (ids 0 1 2 ... per batch).")
    check_batch_memory(sizes, bench.shape)
    for b in sizes:
        bench.input(b)
    _pytorch_rows(bench, autocast)
    _artifact_rows(bench)
    eager = {(r.device, r.batch): r.latency_ms["mean"] for r in bench.rows if r.backend == "pytorch"}
    for r in bench.rows:
        base = eager.get((r.device, r.batch))
        r.speedup = base / r.latency_ms["mean"] if base else None
    return BenchResult(rows=bench.rows, machine=describe_machine(), config=config, notes=bench.notes)
