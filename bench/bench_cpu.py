"""CPU inference benchmark (not a test): every engine atexport can use on a CPU, in ONE run, plus accuracy.

Issue #13's table, measured in one process on one machine so the rows compare:

* **latency** of vit_small_patch16_224 at 224 px (random-init backbone, random rank-16 adapters on every
  block, 10 classes; only shapes matter for speed) at batch 1 and 8: PyTorch eager FP32, PyTorch BF16
  autocast, ``torch.compile`` (inductor, FP32), ONNX Runtime FP32 / INT8 S8S8 (``--target tensorrt``, the
  default) / INT8 U8S8 (``--target cpu``), OpenVINO FP32 / BF16 / INT8 (the same two Q/DQ files). Every
  runner is timed in rotating blocks of consecutive calls (load from other processes hits them alike);
  median ms, and the ratio to PyTorch eager FP32 at the same batch;
* **ONNX Runtime settings** (``--sweep``): threads, graph optimisation level, thread spinning, for FP32 and
  both INT8 files; OpenVINO threads and performance hint; the cost of feeding a separable model's
  weights as inputs in OpenVINO, and of a recompile (what swapping constants would cost instead);
* **top-1** on the digits test split (359 images never trained or calibrated on) of each ``--ckpt``
  (trained with ``atexport train``): PyTorch FP32, ORT FP32 / INT8 S8S8 / INT8 U8S8, OpenVINO FP32 / BF16 /
  INT8 S8S8 / INT8 U8S8 / INT8+BF16 (float ops in BF16). INT8 files are the product's (``quantize_int8``
  with the preset: minmax on calibration/digits.yaml, keep-float auto).

Usage::

    python bench/bench_cpu.py --ckpt /tmp/digits/run.pt [--ckpt vits64/run.pt] [--runs 20] [--sweep]
        [--no-compile] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BACKBONE = "vit_small_patch16_224"


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def machine() -> dict:
    """:func:`atexport.utils.machine.describe_machine` (CPU model and ISA flags, libraries) + OpenVINO's view."""
    from atexport.utils.machine import describe_machine, machine_line

    m = describe_machine()
    try:
        from atexport.runtime.openvino import cpu_capabilities

        m["openvino_capabilities"] = cpu_capabilities()
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        m["openvino_capabilities"] = str(e)
    m["line"] = machine_line(m)
    return m


def proxy_checkpoint(folder: Path) -> Path:
    """vit_small 224, random backbone, random rank-16 adapters on every block, 10 classes."""
    import torch

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import Checkpoint, save_checkpoint, trainable_state
    from atexport.models import (
        ModelSpec,
        backbone_fingerprint,
        create_backbone,
        preprocess_config,
    )

    spec = ModelSpec(backbone=BACKBONE, num_classes=10, source={"kind": "random", "seed": 0},
                     class_names=[str(i) for i in range(10)])
    model = create_backbone(spec)
    fp = backbone_fingerprint(model)
    cfg = AdapterConfig(rank=16, every=1)
    torch.manual_seed(0)  # the adapters' down projections: the same proxy model in every run (--reuse relies on it)
    inject_adapters(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter.up." in name or name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ck = Checkpoint(model=spec, adapter=cfg, regime="adapter", fingerprint=fp,
                    state_dict=trainable_state(model, "adapter"), preprocess=preprocess_config(model))
    return save_checkpoint(ck, folder / "proxy.pt")


def artifacts(ckpt: Path, folder: Path, calib_count: int | None, keep_float) -> dict:
    """FP32 ONNX (fused and separable) and the two INT8 Q/DQ files of a checkpoint (cached in ``folder``)."""
    from atexport.export.onnx import export_onnx
    from atexport.export.precision import Int8Options, quantize_int8
    from atexport.export.settings import ExportSettings

    folder.mkdir(parents=True, exist_ok=True)
    out = {"fp32": folder / "model.onnx", "sep": folder / "sep.onnx",
           "s8s8": folder / "model.s8s8.onnx", "u8s8": folder / "model.u8s8.onnx"}
    if not out["fp32"].is_file():
        say(f"exporting {ckpt} ...")
        export_onnx(ckpt, out["fp32"], ExportSettings(verify=False))
    if not out["sep"].is_file():
        export_onnx(ckpt, out["sep"], ExportSettings(separable=True, verify=False))
    for key, target in (("s8s8", "tensorrt"), ("u8s8", "cpu")):
        if not out[key].is_file():
            say(f"quantizing {out['fp32']} for target {target} ...")
            quantize_int8(out["fp32"], out[key], "digits", verify=False,
                          options=Int8Options(target=target, count=calib_count, keep_float=keep_float))
    return out


def interleaved_latency(runners: dict, x, runs: int, block: int = 5, warm: int = 1, feeds=None) -> dict:
    """Median ms per call of every runner on ``x``, in rotating blocks of ``warm`` + ``block`` calls."""
    names = list(runners)
    times = {n: [] for n in names}
    k = 0
    while min(len(t) for t in times.values()) < runs:
        for n in names[k % len(names):] + names[:k % len(names)]:
            for i in range(warm + block):
                t0 = time.perf_counter()
                runners[n].infer(x, **(feeds or {}))
                if i >= warm:
                    times[n].append((time.perf_counter() - t0) * 1000)
        k += 1
    return {n: statistics.median(t) for n, t in times.items()}


def _ort(path, name, **kw):
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(str(path), name=name, **kw)


def _ov(path, name, precision=None, **kw):
    from atexport.runtime.openvino import OpenVINORunner

    return OpenVINORunner(str(path), precision=precision, name=name, **kw)


def latency_table(files: dict, ckpt: Path, runs: int, compile_: bool) -> dict:
    import torch

    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.runtime.torch import TorchRunner

    model = build_model(load_checkpoint(ckpt)).eval()
    runners = {
        "PyTorch eager FP32": TorchRunner(model, name="eager"),
        "PyTorch eager BF16 autocast": TorchRunner(model, dtype=torch.bfloat16, name="bf16"),
    }
    if compile_:
        runners["torch.compile FP32 (inductor)"] = TorchRunner(torch.compile(model), name="compile")
    runners.update({
        "ORT FP32": _ort(files["fp32"], "ort-fp32"),
        "ORT INT8 S8S8 (--target tensorrt)": _ort(files["s8s8"], "ort-s8s8"),
        "ORT INT8 U8S8 (--target cpu)": _ort(files["u8s8"], "ort-u8s8"),
        "OpenVINO FP32": _ov(files["fp32"], "ov-fp32", "fp32"),
        "OpenVINO BF16": _ov(files["fp32"], "ov-bf16", "bf16"),
        "OpenVINO INT8 (S8S8 file)": _ov(files["s8s8"], "ov-s8s8"),
        "OpenVINO INT8 (U8S8 file)": _ov(files["u8s8"], "ov-u8s8"),
        "OpenVINO INT8+BF16 (S8S8 file)": _ov(files["s8s8"], "ov-s8s8-bf16", "int8+bf16"),
    })
    res = {"rows": {}, "load": {}, "described": {}}
    rng = np.random.default_rng(0)
    for r in runners.values():
        r.activate()
    for name, r in runners.items():
        if hasattr(r, "describe"):
            res["described"][name] = r.describe()
    for bs in (1, 8):
        x = rng.standard_normal((bs, 3, 224, 224)).astype(np.float32)
        t0 = time.perf_counter()
        for name, r in runners.items():  # warm-up (torch.compile compiles here, once per batch size)
            w0 = time.perf_counter()
            r.infer(x)
            r.infer(x)
            if "compile" in name:
                res.setdefault("compile_seconds", {})[bs] = round(time.perf_counter() - w0, 1)
        res["load"][f"b{bs}_start"] = os.getloadavg()[0]
        say(f"timing batch {bs} ({len(runners)} runners, {runs} runs each; warm-up {time.perf_counter() - t0:.0f}s) ...")
        med = interleaved_latency(runners, x, runs)
        res["load"][f"b{bs}_end"] = os.getloadavg()[0]
        for name, ms in med.items():
            res["rows"].setdefault(name, {})[bs] = ms
    for r in runners.values():
        r.deactivate()
    return res


def sweep(files: dict, runs: int) -> dict:
    """ONNX Runtime and OpenVINO settings, each group timed interleaved."""
    import onnxruntime as ort

    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    out = {}
    rng = np.random.default_rng(1)
    for bs in (1, 8):
        x = rng.standard_normal((bs, 3, 224, 224)).astype(np.float32)
        for key in ("fp32", "s8s8", "u8s8"):
            runners = {}
            for opt in ("basic", "extended", "all"):
                runners[f"opt={opt}"] = OnnxRuntimeRunner(str(files[key]), optimization=opt)
            for threads in (1, 2):
                runners[f"threads={threads}"] = OnnxRuntimeRunner(str(files[key]), threads=threads)
            spin = OnnxRuntimeRunner(str(files[key]))
            spin.activate()
            so = ort.SessionOptions()
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            spin.session = ort.InferenceSession(str(files[key]), so, providers=["CPUExecutionProvider"])
            runners["no spinning"] = spin
            for r in runners.values():
                r.activate()
                r.infer(x)
            say(f"sweep ORT {key} b{bs} ...")
            out[f"ORT {key} b{bs}"] = interleaved_latency(runners, x, runs)
        ov_runners = {
            "fp32 LATENCY": _ov(files["fp32"], "a", "fp32"),
            "fp32 THROUGHPUT": _ov(files["fp32"], "b", "fp32", performance_hint="THROUGHPUT"),
            "fp32 threads=1": _ov(files["fp32"], "c", "fp32", threads=1),
            "bf16 LATENCY": _ov(files["fp32"], "d", "bf16"),
            "separable fp32 (weights fed)": _ov(files["sep"], "e", "fp32"),
            "separable fp32 (weights constant)": _ov(files["sep"], "f", "fp32", swappable=False),
            "separable bf16 (weights fed)": _ov(files["sep"], "g", "bf16"),
            "int8 s8s8": _ov(files["s8s8"], "h"),
        }
        for r in ov_runners.values():
            r.activate()
            r.infer(x)
        say(f"sweep OpenVINO b{bs} ...")
        out[f"OpenVINO b{bs}"] = interleaved_latency(ov_runners, x, runs)
        out["OpenVINO compile seconds"] = {k: round(r.compile_seconds, 2) for k, r in ov_runners.items()}
    return out


def swap_cost(files: dict) -> dict:
    """Live task swap in OpenVINO (weights fed as inputs) against a recompile, and ONNX Runtime's swap."""
    import onnx
    from onnx import numpy_helper

    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.runtime.openvino import OpenVINORunner
    from atexport.runtime.session import AdapterSession

    proto = onnx.load(str(files["sep"]))
    meta = read_onnx_metadata(proto)
    inits = {e.get("initializer", k) for k, e in meta.manifest.items()}
    w = {i.name: numpy_helper.to_array(i) * 1.01 for i in proto.graph.initializer if i.name in inits}
    out = {}
    ov = OpenVINORunner(str(files["sep"]), precision="fp32").activate()
    t0 = time.perf_counter()
    ov.swap(weights=w, name="b")
    out["openvino live swap (add + use, ms)"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    ov.use(None)
    ov.use("b")
    out["openvino switch between loaded tasks (us)"] = (time.perf_counter() - t0) * 1e6 / 2
    out["openvino compile of the model (what a recompile per swap costs, ms)"] = ov.compile_seconds * 1000
    fresh = OpenVINORunner(str(files["sep"]), precision="fp32", swappable=False)
    t0 = time.perf_counter()
    fresh.activate()
    out["openvino read + expose/compile, fixed weights (ms)"] = (time.perf_counter() - t0) * 1000
    s = AdapterSession(str(files["sep"])).activate()
    t0 = time.perf_counter()
    s.swap(weights=w, name="b")
    out["onnxruntime AdapterSession live swap (ms)"] = (time.perf_counter() - t0) * 1000
    x = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
    out["max abs openvino vs onnxruntime after swap"] = float(np.abs(ov.infer(x) - s.infer(x)).max())
    return out


def digits_test(preprocess: dict):
    from atexport.data import load_dataset
    from atexport.runtime.preprocess import Preprocessor

    ds = load_dataset("digits", "test", size=64)
    pairs = [ds[i] for i in range(len(ds))]
    return Preprocessor(preprocess)([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def accuracy(ckpt: Path, files: dict) -> dict:
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.runtime.torch import TorchRunner

    ck = load_checkpoint(ckpt)
    x, y = digits_test(ck.preprocess)
    runners = {
        "PyTorch FP32": TorchRunner(build_model(ck)),
        "ORT FP32": _ort(files["fp32"], "ort-fp32"),
        "ORT INT8 S8S8": _ort(files["s8s8"], "ort-s8s8"),
        "ORT INT8 U8S8": _ort(files["u8s8"], "ort-u8s8"),
        "OpenVINO FP32": _ov(files["fp32"], "ov-fp32", "fp32"),
        "OpenVINO BF16": _ov(files["fp32"], "ov-bf16", "bf16"),
        "OpenVINO INT8 S8S8": _ov(files["s8s8"], "ov-s8s8"),
        "OpenVINO INT8 U8S8": _ov(files["u8s8"], "ov-u8s8"),
        "OpenVINO INT8+BF16 S8S8": _ov(files["s8s8"], "ov-s8s8-bf16", "int8+bf16"),
    }
    logits = {}
    for name, r in runners.items():
        with r:
            logits[name] = np.concatenate([r.infer(x[i:i + 32]) for i in range(0, len(x), 32)])
    ref = logits["ORT FP32"]
    out = {}
    for name, lg in logits.items():
        pred = lg.argmax(1)
        out[name] = {"top1": float((pred == y).mean()), "agreement": float((pred == ref.argmax(1)).mean()),
                     "max_abs_vs_ort_fp32": float(np.abs(lg - ref).max())}
    return {"images": len(y), "rows": out}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['line']}", f"OpenVINO CPU capabilities: {m['openvino_capabilities']}",
             f"Date {m['date']}; load average at start {res['load_start']:.2f}, end {res['load_end']:.2f}.", ""]
    lat = res.get("latency")
    if lat:
        eager = lat["rows"]["PyTorch eager FP32"]
        lines += ["| engine (vit_small 224, rank-16 adapters) | b1 ms | b8 ms | b1 vs eager | b8 vs eager |",
                  "|---|---|---|---|---|"]
        for name, r in lat["rows"].items():
            lines.append(f"| {name} | {r[1]:.1f} | {r[8]:.1f} | {r[1] / eager[1]:.2f}x | {r[8] / eager[8]:.2f}x |")
        lines.append("")
        lines.append("Load during timing: " + ", ".join(f"{k} {v:.2f}" for k, v in lat["load"].items()))
        if lat.get("compile_seconds"):
            lines.append(f"torch.compile warm-up (s): {lat['compile_seconds']}")
        lines += [f"- {k}: {v}" for k, v in lat["described"].items()]
        lines.append("")
    for label, acc in (res.get("accuracy") or {}).items():
        fp = acc["rows"]["PyTorch FP32"]["top1"]
        lines += [f"Top-1 on the digits test split ({acc['images']} images), {label}:", "",
                  "| engine | top-1 | vs PyTorch FP32 | agreement with ORT FP32 | max abs vs ORT FP32 |", "|---|---|---|---|---|"]
        for name, r in acc["rows"].items():
            lines.append(f"| {name} | {r['top1']:.2%} | {100 * (r['top1'] - fp):+.2f} pt | {r['agreement']:.2%} | "
                         f"{r['max_abs_vs_ort_fp32']:.3g} |")
        lines.append("")
    if res.get("sweep"):
        lines.append("Settings sweep (median ms, each group timed interleaved):")
        for group, rows in res["sweep"].items():
            lines.append(f"- {group}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows.items()))
        lines.append("")
    if res.get("swap"):
        lines.append("Separable swap: " + "; ".join(f"{k} {v:.3g}" for k, v in res["swap"].items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", default=[], help="trained checkpoint(s) for the top-1 table")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time ORT / OpenVINO settings and the swap cost")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compilation on 2 cores)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--calib-count", type=int, default=128, help="calibration images for the proxy's INT8 files")
    ap.add_argument("--workdir", default="/tmp/atexport-bench-cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(), "load_start": os.getloadavg()[0]}
    say(res["machine"]["line"])
    for i, ck in enumerate(args.ckpt):
        files = artifacts(Path(ck), work / f"trained{i}", None, None)
        say(f"accuracy of {ck} ...")
        res.setdefault("accuracy", {})[str(ck)] = accuracy(Path(ck), files)
    if not args.no_latency or args.sweep:
        proxy = work / "proxy.pt"
        if not proxy.is_file():
            proxy_checkpoint(work)
        files = artifacts(proxy, work / "proxy", args.calib_count, "none")
        if not args.no_latency:
            res["latency"] = latency_table(files, proxy, args.runs, not args.no_compile)
        if args.sweep:
            res["sweep"] = sweep(files, max(args.runs // 2, 6))
            res["swap"] = swap_cost(files)
    res["load_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    print(markdown(res))


if __name__ == "__main__":
    main()
