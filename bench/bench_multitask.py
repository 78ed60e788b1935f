"""Benchmark of multi-task serving (not a test): one multi-task model vs K single-task models.

For K tasks on one random-init backbone (adapters rank 16 on every block, non-zero weights, class
counts cycling through ``--classes``) it measures, with ONNX Runtime on the CPU:

* throughput of one multi-task model (``atexport onnx --multitask``) on a mixed batch of ``--batch``
  images (task ids interleaved), against K single-task sessions each given its share of the batch;
* the reference: one single-task model at the same batch size (the goal is the multi-task model
  within 10% of it). It runs in the same process, alternating with the setup measured, so load
  from other jobs on a shared machine hits both alike;
* resident memory: each setup is loaded in a fresh subprocess; RSS after importing onnxruntime,
  after loading the sessions and one warm batch, and the peak (VmHWM), before the reference is loaded;
* parity at this scale: each multi-task row against the same sample through its task's own model.

The K single-task files are separable exports plus ``swap_onnx`` (one export per class count: the
same graph and speed as a fused export, measured in the ONNX export section).

Usage::

    python bench/bench_multitask.py                     # K = 1 4 16, batch 16, prints a markdown section
    python bench/bench_multitask.py --ks 1 4 --batch 8 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def machine() -> dict:
    """The machine and library versions, flat (atexport.benchmark.describe_machine underneath)."""
    from atexport.utils.machine import describe_machine, library_versions

    m = describe_machine()
    libs = library_versions(("torch", "timm", "onnx", "onnxruntime", "onnxslim", "onnxsim"))
    return {"cpu": m["cpu"], "nproc": m["cores"], "python": m["python"], "date": m["date"],
            **{k: libs.get(k, "?") for k in ("torch", "timm", "onnx", "onnxruntime", "onnxslim", "onnxsim")}}


def make_ckpts(backbone: str, folder: Path, k: int, classes: list[int], rank: int) -> list[Path]:
    """K adapter checkpoints on one random backbone saved as a weights file (so that tasks with
    different class counts share its fingerprint; a random timm init depends on num_classes)."""
    import torch

    from atexport.adapter import AdapterConfig
    from atexport.checkpoint import Checkpoint, save_checkpoint
    from atexport.models import ModelSpec, backbone_fingerprint, create_backbone, preprocess_config

    model = create_backbone(ModelSpec(backbone=backbone, num_classes=classes[0]))
    weights = folder / "backbone.pt"
    torch.save({n: t for n, t in model.state_dict().items() if not n.startswith("head.")}, weights)
    fp, prep = backbone_fingerprint(model), preprocess_config(model)
    dim, depth = int(model.embed_dim), len(model.blocks)
    cfg = AdapterConfig(rank=rank, every=1)
    out = []
    for t in range(k):
        c = classes[t % len(classes)]
        g = torch.Generator().manual_seed(100 + t)
        sd = {}
        for i in cfg.placed(depth):
            sd[f"blocks.{i}.adapter.down.weight"] = torch.randn(rank, dim, generator=g) * 0.05
            sd[f"blocks.{i}.adapter.down.bias"] = torch.zeros(rank)
            sd[f"blocks.{i}.adapter.up.weight"] = torch.randn(dim, rank, generator=g) * 0.02
            sd[f"blocks.{i}.adapter.up.bias"] = torch.randn(dim, generator=g) * 0.02
        sd["head.weight"] = torch.randn(c, dim, generator=g) * 0.02
        sd["head.bias"] = torch.zeros(c)
        spec = ModelSpec(backbone=backbone, num_classes=c, source={"kind": "file", "path": str(weights)},
                         class_names=[f"t{t}_c{j}" for j in range(c)])
        ck = Checkpoint(model=spec, adapter=cfg, regime="adapter", fingerprint=fp, state_dict=sd, preprocess=prep)
        out.append(save_checkpoint(ck, folder / f"task{t:02d}.pt"))
    return out


# --------------------------------------------------------------------------------------------------
# Worker: one setup in a fresh process
# --------------------------------------------------------------------------------------------------


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> dict:
    import onnxruntime  # noqa: F401  (imported before the baseline RSS is taken)

    from atexport.runtime.onnxruntime import create_session

    rss0 = _status("VmRSS")
    b, k = spec["batch"], spec["k"]
    x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
    ids = ((np.arange(b)) % k).astype(np.int64)
    t0 = time.perf_counter()
    if spec["mode"] == "multi":
        sess = create_session(spec["models"][0])

        def run():
            return sess.run(None, {"input": x, "task_id": ids})[0]
    else:
        sessions = [create_session(m) for m in spec["models"]]
        shares = [np.flatnonzero(ids == t) for t in range(k)]

        def run():
            return [s.run(None, {"input": x[sh]})[0] for s, sh in zip(sessions, shares)]

    load_s = time.perf_counter() - t0
    out = run()
    rss1, hwm = _status("VmRSS"), _status("VmHWM")
    ref = create_session(spec["reference"])

    def run_ref():
        return ref.run(None, {"input": x})[0]

    run_ref()
    t_setup, t_ref = [], []
    for _ in range(spec["rounds"]):
        for fn, acc in ((run, t_setup), (run_ref, t_ref)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    logits = out if spec["mode"] == "multi" else _scatter(out, ids, k)
    np.save(spec["logits"], logits)
    return {
        "mode": spec["mode"], "k": k, "batch": b, "load_s": load_s,
        "rss_base_mb": rss0, "rss_loaded_mb": rss1, "rss_peak_mb": hwm,
        "ms_setup": 1000 * statistics.median(t_setup), "ms_ref": 1000 * statistics.median(t_ref),
        "ms_setup_all": [1000 * v for v in t_setup], "ms_ref_all": [1000 * v for v in t_ref],
    }


def _scatter(outs, ids, k) -> np.ndarray:
    width = max(o.shape[1] for o in outs)
    y = np.full((len(ids), width), np.nan, np.float32)
    for t in range(k):
        rows = np.flatnonzero(ids == t)
        y[rows, : outs[t].shape[1]] = outs[t]
    return y


def run_worker(spec: dict, folder: Path) -> dict:
    path = folder / f"spec_{spec['mode']}_{spec['k']}.json"
    path.write_text(json.dumps(spec))
    res = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec['mode']} K={spec['k']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def bench(args, folder: Path) -> dict:
    from atexport.checkpoint import load_checkpoint
    from atexport.export.multitask import export_multitask
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings
    from atexport.export.swap import swap_onnx

    kmax = max(args.ks)
    t = time.perf_counter()
    ckpts = make_ckpts(args.backbone, folder, kmax, args.classes, args.rank)
    classes = [load_checkpoint(c).model.num_classes for c in ckpts]
    res = {"setup_s": {"checkpoints": time.perf_counter() - t}, "runs": [], "exports": {}}
    t = time.perf_counter()
    reference = export_onnx(ckpts[0], folder / "reference_fused.onnx", ExportSettings(verify=False)).path
    res["setup_s"]["reference_export"] = time.perf_counter() - t
    t = time.perf_counter()
    singles, base = [], {}
    for i, ck in enumerate(ckpts):
        c = classes[i]
        if c not in base:
            base[c] = export_onnx(ck, folder / f"single{i:02d}.onnx", ExportSettings(separable=True, verify=False)).path
            singles.append(base[c])
        else:
            singles.append(swap_onnx(base[c], ck, folder / f"single{i:02d}.onnx").path)
    res["setup_s"]["single_task_files"] = time.perf_counter() - t
    for k in args.ks:
        t = time.perf_counter()
        r = export_multitask(ckpts[:k], folder / f"multi{k:02d}.onnx", ExportSettings(verify=False))
        res["exports"][k] = {"export_s": time.perf_counter() - t, "size_mb": r.size_bytes / 1e6,
                             "singles_size_mb": sum(Path(p).stat().st_size for p in singles[:k]) / 1e6,
                             "nodes": r.nodes}
        print(f"  exported K={k} in {res['exports'][k]['export_s']:.1f}s", flush=True)
    for k in args.ks:
        common = {"k": k, "batch": args.batch, "rounds": args.rounds, "reference": str(reference)}
        multi = run_worker({**common, "mode": "multi", "models": [str(folder / f"multi{k:02d}.onnx")],
                            "logits": str(folder / f"multi{k}.npy")}, folder)
        single = run_worker({**common, "mode": "singles", "models": [str(p) for p in singles[:k]],
                             "logits": str(folder / f"singles{k}.npy")}, folder)
        ym, ys = np.load(folder / f"multi{k}.npy"), np.load(folder / f"singles{k}.npy")
        valid = ~np.isnan(ys)
        multi["max_abs_vs_singles"] = float(np.abs(ym[:, : ys.shape[1]][valid] - ys[valid]).max())
        res["runs"] += [multi, single]
        print(f"  K={k}: multi {multi['ms_setup']:.0f} ms (ref {multi['ms_ref']:.0f}), "
              f"{k} sessions {single['ms_setup']:.0f} ms (ref {single['ms_ref']:.0f}); "
              f"RSS {multi['rss_loaded_mb'] - multi['rss_base_mb']:.0f} vs "
              f"{single['rss_loaded_mb'] - single['rss_base_mb']:.0f} MB; max abs {multi['max_abs_vs_singles']:.1e}",
              flush=True)
    return res


def markdown(mach: dict, res: dict, args, argv: str, load: tuple) -> str:
    b = args.batch
    lines = [
        f"## Multi-task serving (issue #6) — {mach['date']}",
        "",
        f"Machine: {mach['cpu']}, {mach['nproc']} cores, shared with other jobs (load average "
        f"{load[0]:.1f} at start, {load[1]:.1f} at end: timings are indicative), no GPU. Python {mach['python']}, "
        f"torch {mach['torch']}, timm {mach['timm']}, onnx {mach['onnx']}, onnxruntime {mach['onnxruntime']}.",
        "",
        f"Command: `{argv}` ({args.backbone}, random init, adapters rank {args.rank} on every block, class counts "
        f"cycling {args.classes}; ONNX Runtime CPU, ORT_ENABLE_ALL, default threads; batch {b} of 224 px images with "
        f"task ids interleaved 0,1,..,K-1,0,..; median of {args.rounds} rounds, each setup alternating with the "
        "single-task reference in the same process; each setup in a fresh subprocess).",
        "",
        f"| K | setup | ms / batch of {b} | images/s | vs single-task model, batch {b} | RSS loaded - base (MB) | peak RSS (MB) | files (MB) | max abs vs own model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        k = r["k"]
        e = res["exports"][k] if k in res["exports"] else res["exports"][str(k)]
        name = "1 multi-task model" if r["mode"] == "multi" else f"{k} single-task session{'s' if k > 1 else ''}"
        size = e["size_mb"] if r["mode"] == "multi" else e["singles_size_mb"]
        parity = f"{r['max_abs_vs_singles']:.1e}" if "max_abs_vs_singles" in r else "(reference)"
        lines.append(
            f"| {k} | {name} | {r['ms_setup']:.0f} | {1000 * b / r['ms_setup']:.1f} | "
            f"{r['ms_setup'] / r['ms_ref']:.3f}x time (ref {r['ms_ref']:.0f} ms) | "
            f"{r['rss_loaded_mb'] - r['rss_base_mb']:.0f} | {r['rss_peak_mb']:.0f} | {size:.1f} | {parity} |"
        )
    ex = ", ".join(f"K={k}: {e['export_s']:.1f}s" for k, e in res["exports"].items())
    lines += ["", f"Export of the multi-task models (no parity check): {ex}. Setup: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in res["setup_s"].items()) + "."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_small_patch16_224")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 37, 100])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per setup (each: setup batch + reference batch)")
    ap.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker.read_text()))))
        return
    if max(args.ks) > 0 and args.batch < max(args.ks):
        ap.error("--batch must be >= the largest K (every task gets at least one sample).")
    mach = machine()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="atexport-bench-mt-") as tmp:
        res = bench(args, Path(tmp))
    load1 = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps({"machine": mach, "results": res}, indent=2, default=str))
    argv = "python bench/bench_multitask.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("json", "worker") and v != ap.get_default(k)
    )
    print(markdown(mach, res, args, argv.strip(), (load0, load1)))


if __name__ == "__main__":
    main()
