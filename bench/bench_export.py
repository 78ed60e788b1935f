"""Benchmark of the ONNX export stage (not a test): export cost, simplifiers, adapter overhead, swap time.

For each backbone (random init; only shapes matter here) it builds adapter checkpoints (rank 16 on
every block, non-zero weights, two tasks) and a head-only checkpoint, then measures:

* export wall time, file size and node count, fused and separable, with onnxslim, onnxsim or no
  simplification (each export includes atexport's parity check, whose time is listed separately);
* ONNX Runtime latency (CPU, median of timed runs) without adapters, with fused adapters and with
  separable adapters (task weights fed as overridable initializers), at batch 1 and 8;
* task swap time: live (``AdapterSession.swap`` from a task ``.npz`` file, from a loaded checkpoint and
  from arrays), file (``swap_onnx``), against a fresh export of the other task.

Usage::

    python bench/bench_export.py                       # both models, prints a markdown section
    python bench/bench_export.py --models deit_tiny_patch16_224 --runs 20 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("vit_small_patch16_224", "deit_tiny_patch16_224")
# onnxsim is optional (not an atexport dependency): its rows are measured where it is installed.
SIMPLIFIERS = tuple(s for s in ("onnxslim", "onnxsim", None) if s is None or importlib.util.find_spec(s))


def machine() -> dict:
    """The machine and library versions, flat (atexport.benchmark.describe_machine underneath)."""
    from atexport.utils.machine import describe_machine, library_versions

    m = describe_machine()
    libs = library_versions(("torch", "timm", "onnx", "onnxruntime", "onnxslim", "onnxsim"))
    return {"cpu": m["cpu"], "nproc": m["cores"], "python": m["python"], "date": m["date"],
            **{k: libs.get(k, "?") for k in ("torch", "timm", "onnx", "onnxruntime", "onnxslim", "onnxsim")}}


def make_ckpts(backbone: str, folder: Path, num_classes: int, rank: int) -> dict:
    """Two adapter tasks and one head-only checkpoint on the same random backbone."""
    import torch

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import Checkpoint, save_checkpoint, trainable_state
    from atexport.models import ModelSpec, backbone_fingerprint, create_backbone, preprocess_config

    spec = ModelSpec(backbone=backbone, num_classes=num_classes, source={"kind": "random", "seed": 0},
                     class_names=[f"c{i}" for i in range(num_classes)])
    out = {}
    for task, seed in (("task_a", 1), ("task_b", 2)):
        model = create_backbone(spec)
        fp = backbone_fingerprint(model)
        cfg = AdapterConfig(rank=rank, every=1)
        inject_adapters(model, cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapter.up." in name or name.startswith("head."):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ck = Checkpoint(model=spec, adapter=cfg, regime="adapter", fingerprint=fp,
                        state_dict=trainable_state(model, "adapter"), preprocess=preprocess_config(model))
        out[task] = save_checkpoint(ck, folder / f"{backbone}_{task}.pt")
    model = create_backbone(spec)
    ck = Checkpoint(model=spec, adapter=None, regime="head", fingerprint=backbone_fingerprint(model),
                    state_dict=trainable_state(model, "head"), preprocess=preprocess_config(model))
    out["head_only"] = save_checkpoint(ck, folder / f"{backbone}_head_only.pt")
    return out


def latency(model_path, batch: int, runs: int, feeds=None, threads=None) -> float:
    """Median ONNX Runtime latency in ms (ORT_ENABLE_ALL, CPU)."""
    from atexport.runtime.onnxruntime import create_session

    sess = create_session(model_path, threads=threads)
    meta_in = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *meta_in.shape[1:])).astype(np.float32)
    feed = {meta_in.name: x, **(feeds or {})}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def bench_model(backbone: str, folder: Path, args) -> dict:
    from atexport.artifact.fit import check_fits
    from atexport.checkpoint import export_task_weights, load_checkpoint
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.export.swap import swap_onnx
    from atexport.runtime.session import AdapterSession

    ck = make_ckpts(backbone, folder, args.classes, args.rank)
    res = {"backbone": backbone, "exports": [], "latency_ms": {}, "swap_ms": {}}
    paths = {}
    for separable in (False, True):
        for simplifier in SIMPLIFIERS:
            name = f"{'separable' if separable else 'fused'}-{simplifier or 'raw'}"
            out = folder / f"{backbone}_{name}.onnx"
            t = time.perf_counter()
            r = export_onnx(ck["task_a"], out, ExportSettings(separable=separable, simplify=simplifier is not None,
                                                               simplifier=simplifier))
            wall = time.perf_counter() - t
            paths[name] = out
            res["exports"].append({
                "variant": name, "wall_s": wall, **{f"{k}_s": v for k, v in r.seconds.items()},
                "size_mb": r.size_bytes / 1e6, "nodes_exported": r.nodes["exported"],
                "nodes_final": r.nodes["simplified"] or r.nodes["exported"],
                "parity_max_abs": max(p.max_abs for p in r.parity), "parity_passed": r.passed,
                "latency_b1_ms": latency(out, 1, args.runs),
            })
            print(f"  {backbone} {name}: {res['exports'][-1]}", flush=True)
    head = folder / f"{backbone}_head_only.onnx"
    export_onnx(ck["head_only"], head)
    b_fresh = folder / f"{backbone}_fresh_b.onnx"
    t = time.perf_counter()
    rb = export_onnx(ck["task_b"], b_fresh, ExportSettings(separable=True))
    res["reexport_s"] = time.perf_counter() - t
    res["reexport_export_step_s"] = rb.seconds["export"]

    sep = paths["separable-onnxslim"]
    for batch in (1, 8):
        res["latency_ms"][f"b{batch}"] = {
            "no_adapters": latency(head, batch, args.runs),
            "fused_adapters": latency(paths["fused-onnxslim"], batch, args.runs),
            "separable_adapters": latency(sep, batch, args.runs),
        }
        print(f"  {backbone} latency b{batch}: {res['latency_ms'][f'b{batch}']}", flush=True)

    # swap times (median of several)
    sess = AdapterSession(sep).activate()
    ckpt_b = load_checkpoint(ck["task_b"])
    arrays = check_fits(sess.metadata, ckpt_b.task_weights())
    npz_b = export_task_weights(ckpt_b, folder / "task_b.npz")  # the torch-free task file an app swaps from

    def timed(fn, n=args.swap_runs):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000)
        return statistics.median(ts)

    res["swap_ms"]["live_from_file"] = timed(lambda: sess.swap(npz_b, "b"))
    res["swap_ms"]["live_from_loaded_ckpt"] = timed(lambda: sess.swap(ckpt_b, "b"))
    res["swap_ms"]["live_from_arrays"] = timed(lambda: sess.swap(weights=arrays, name="b"))
    res["swap_ms"]["live_switch_loaded_task"] = timed(lambda: sess.use("b"))
    res["swap_ms"]["file_swap_onnx"] = timed(lambda: swap_onnx(sep, ck["task_b"], folder / "swapped.onnx"), 3)
    x = np.random.default_rng(0).standard_normal((4, *sess.metadata.input["shape"][1:])).astype(np.float32)
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    ref = OnnxRuntimeRunner(b_fresh).infer(x)
    res["swap_vs_fresh_max_abs"] = {
        "live": float(np.abs(sess.infer(x, task="b") - ref).max()),
        "file": float(np.abs(OnnxRuntimeRunner(folder / "swapped.onnx").infer(x) - ref).max()),
    }
    print(f"  {backbone} swap: {res['swap_ms']} vs re-export {res['reexport_s']:.2f}s", flush=True)
    return res


def markdown(mach: dict, results: list, argv: str) -> str:
    lines = [
        f"## ONNX export (issue #3) — {mach['date']}",
        "",
        f"Machine: {mach['cpu']}, {mach['nproc']} cores (shared with other jobs: latencies are indicative), no GPU. "
        f"Python {mach['python']}, torch {mach['torch']}, timm {mach['timm']}, onnx {mach['onnx']}, "
        f"onnxruntime {mach['onnxruntime']}, onnxslim {mach['onnxslim']}, onnxsim {mach['onnxsim']}.",
        "",
        f"Command: `{argv}` (random-init backbones, adapters rank 16 on every block, {results[0]['classes']} classes; "
        "every export includes the parity check; ONNX Runtime CPU, ORT_ENABLE_ALL, default threads, median).",
        "",
    ]
    for r in results:
        lines += [f"### {r['backbone']}", "",
                  "| variant | export wall (s) | of which export / simplify / parity (s) | size (MB) | nodes exported -> final | parity max abs | ORT b1 (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for e in r["exports"]:
            lines.append(
                f"| {e['variant']} | {e['wall_s']:.1f} | {e['export_s']:.1f} / {e.get('simplify_s', 0):.2f} / {e.get('verify_s', 0):.1f} "
                f"| {e['size_mb']:.1f} | {e['nodes_exported']} -> {e['nodes_final']} | {e['parity_max_abs']:.1e} | {e['latency_b1_ms']:.1f} |"
            )
        lines += ["", "| ORT latency (ms) | no adapters | fused adapters | separable adapters |", "|---|---|---|---|"]
        for b, d in r["latency_ms"].items():
            lines.append(f"| batch {b[1:]} | {d['no_adapters']:.1f} | {d['fused_adapters']:.1f} | {d['separable_adapters']:.1f} |")
        s = r["swap_ms"]
        lines += [
            "",
            f"Swap to task B: live `AdapterSession.swap(task .npz)` {s['live_from_file']:.1f} ms, from a loaded checkpoint "
            f"{s['live_from_loaded_ckpt']:.1f} ms, from arrays {s['live_from_arrays']:.2f} ms, switching between loaded tasks "
            f"{s['live_switch_loaded_task'] * 1000:.1f} µs; file `swap_onnx` {s['file_swap_onnx']:.0f} ms; "
            f"vs a fresh export of B {r['reexport_s']:.1f} s (export step alone {r['reexport_export_step_s']:.1f} s). "
            f"Swapped vs fresh export max abs diff: live {r['swap_vs_fresh_max_abs']['live']:.1e}, "
            f"file {r['swap_vs_fresh_max_abs']['file']:.1e}.",
            "",
        ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=30, help="timed ORT runs per latency")
    ap.add_argument("--swap-runs", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    args = ap.parse_args()
    mach = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="atexport-bench-") as tmp:
        for m in args.models:
            r = bench_model(m, Path(tmp), args)
            r["classes"] = args.classes
            results.append(r)
    if args.json:
        args.json.write_text(json.dumps({"machine": mach, "results": results}, indent=2))
    argv = "python bench/bench_export.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "json" and v != ap.get_default(k)
    )
    print(markdown(mach, results, argv.strip()))


if __name__ == "__main__":
    main()
