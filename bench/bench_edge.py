"""On-device engines side by side (not a test): latency at batch 1 and digits top-1 of every artifact.

Issue #21's table, in one process on one machine: PyTorch eager FP32, ONNX Runtime FP32, OpenVINO FP32,
LiteRT FP32 / INT8 (dynamic-range) and ExecuTorch + XNNPACK FP32 / INT8 (dynamic per-channel), each
artifact written by the product's own exporters (verified against PyTorch at export).

* **latency** (median ms of ``--runs`` calls after warm-up, batch 1, runners timed in rotating blocks) of
  each ``--ckpt`` and, with ``--proxy``, of vit_small_patch16_224 at 224 px (random backbone, random rank-16
  adapters, 10 classes; ``bench_cpu.proxy_checkpoint``);
* **top-1** on the digits test split of the first ``--ckpt`` (trained with ``atexport train --recipe digits``).

Usage::

    python bench/bench_edge.py --ckpt /tmp/digits/run.pt [--proxy] [--runs 50] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def build(ckpt: Path, workdir: Path, refused: dict) -> dict:
    """Every artifact of ``ckpt``: ``{label: (runner factory, export seconds)}``; an artifact the export
    refused (parity) goes to ``refused`` with its worst row, and is not timed."""
    from atexport.errors import ParityError
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.export.executorch import export_executorch
    from atexport.export.litert import export_litert
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.runtime.executorch import ExecuTorchRunner
    from atexport.runtime.litert import LiteRTRunner
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.openvino import OpenVINORunner
    from atexport.runtime.torch import TorchRunner

    workdir.mkdir(parents=True, exist_ok=True)
    out = {"PyTorch FP32": (lambda: TorchRunner(build_model(load_checkpoint(ckpt))), 0.0)}
    t0 = time.perf_counter()
    onnx = export_onnx(ckpt, workdir / "m.onnx", ExportSettings(batch=1)).path
    s = time.perf_counter() - t0
    out["ONNX Runtime FP32"] = (lambda: OnnxRuntimeRunner(str(onnx)), s)
    out["OpenVINO FP32"] = (lambda: OpenVINORunner(str(onnx), precision="fp32"), s)
    for prec in ("fp32", "int8"):
        for label, export, suffix, runner in (("LiteRT", export_litert, "tflite", LiteRTRunner),
                                              ("ExecuTorch", export_executorch, "pte", ExecuTorchRunner)):
            say(f"  {label} {prec} ...")
            try:
                r = export(ckpt, workdir / f"m.{prec}.{suffix}", precision=prec)
            except ParityError as e:
                rows = [x for x in e.result.parity if not x.passed]
                refused[f"{label} {prec.upper()}"] = "; ".join(f"{x.name}: {', '.join(x.failures)}" for x in rows)
                continue
            out[f"{label} {prec.upper()}"] = ((lambda p=r.path, R=runner: R(str(p))), r.seconds["total"])
    return out


def latency(engines: dict, shape, runs: int) -> dict:
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    runners = {k: f().activate() for k, (f, _) in engines.items()}
    for r in runners.values():
        for _ in range(5):
            r.infer(x)
    times = {k: [] for k in runners}
    block = 5
    for _ in range(max(runs // block, 1)):
        for k, r in runners.items():
            for _ in range(block):
                t0 = time.perf_counter()
                r.infer(x)
                times[k].append((time.perf_counter() - t0) * 1000)
    for r in runners.values():
        r.deactivate()
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(ckpt: Path, engines: dict) -> dict:
    from bench_cpu import digits_test

    from atexport.checkpoint import load_checkpoint

    x, y = digits_test(load_checkpoint(ckpt).preprocess)
    out = {}
    for k, (f, _) in engines.items():
        with f() as r:
            logits = np.concatenate([r.infer(x[i:i + 1]) for i in range(len(x))])
        out[k] = float((logits.argmax(1) == y).mean())
    out["_images"] = int(len(y))
    return out


def main():
    from bench_cpu import proxy_checkpoint

    from atexport.utils.machine import describe_machine, machine_line

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", action="append", default=[], type=Path)
    ap.add_argument("--proxy", action="store_true", help="also vit_small 224 (random backbone, rank-16 adapters)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_edge"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    machine = describe_machine()
    res = {"machine": machine_line(machine), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}
    ckpts = list(a.ckpt) + ([proxy_checkpoint(a.workdir / "proxy")] if a.proxy else [])
    for i, ck in enumerate(ckpts):
        say(f"{ck}: exporting ...")
        from atexport.checkpoint import load_checkpoint

        c = load_checkpoint(ck)
        refused: dict = {}
        engines = build(ck, a.workdir / f"m{i}", refused)
        shape = [int(v) for v in c.preprocess["input_size"]]
        say(f"{ck}: timing ...")
        row = {"backbone": c.model.backbone, "input": shape, "latency_ms": latency(engines, shape, a.runs),
               "export_s": {k: round(s, 1) for k, (_, s) in engines.items()}, "refused": refused}
        if i == 0 and a.ckpt:
            say(f"{ck}: digits top-1 ...")
            row["top1"] = accuracy(ck, engines)
        res["models"][str(ck)] = row
        if a.json:  # after every model: a later failure keeps what was measured
            a.json.write_text(json.dumps(res, indent=2))
    lines = [f"Machine: {res['machine']}; {res['date']}; batch 1, median of {a.runs} runs.", ""]
    for ck, row in res["models"].items():
        lines += [f"{row['backbone']} at {row['input'][1]} px ({Path(ck).parent.name}/{Path(ck).name}):", "",
                  "| engine | latency ms | vs PyTorch | export s |" + (" top-1 digits |" if "top1" in row else ""),
                  "|---|---|---|---|" + ("---|" if "top1" in row else "")]
        base = row["latency_ms"]["PyTorch FP32"]
        for k, ms in row["latency_ms"].items():
            acc = f" {row['top1'][k]:.2%} |" if "top1" in row else ""
            lines.append(f"| {k} | {ms:.2f} | {base / ms:.2f}x | {row['export_s'][k]} |{acc}")
        if "top1" in row:
            lines.append(f"\n(top-1 on {row['top1']['_images']} digits test images)")
        for k, why in row.get("refused", {}).items():
            lines.append(f"\n{k}: refused by its export's parity check ({why}).")
        lines.append("")
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
