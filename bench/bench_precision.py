"""Benchmark of the precision stage on CPU (not a test): top-1 accuracy and ONNX Runtime latency of INT8.

Two kinds of model, side by side in one process, all scored on the digits *test* split of
``atexport.data`` (359 images the models never trained or calibrated on; calibration uses the training
pool, ``calibration/digits.yaml``):

* **proxy**: vit_small_patch16_224 at 224 px with a random-init backbone (no hub weights offline) and
  random rank-16 adapters, whose head is a logistic regression fitted on the adapted features of
  ``--train`` training images. Its class margins are tiny, so it magnifies any quantization noise.
* **trained** (``--ckpt run.pt``, repeatable): checkpoints from ``atexport train`` whose adapters and head
  were trained by atexport's trainer, e.g. the offline quickstart and a vit_small (see bench/RESULTS.md
  for the commands).

Per model: PyTorch eager FP32, ORT FP32, and ORT INT8 variants: Linear-only Q/DQ for TensorRT (S8S8,
per-channel weights) with each ``--methods`` calibration, all Linear layers quantized (``keep_float
none``) and with the sensitivity-based mixed precision (``keep_float auto``, the preset), plus
(``--extras``) FP16, the U8S8 CPU target, the all-ops counter-example and dynamic INT8 on the proxy.
Columns: top-1, its change against ORT FP32 in points with the images that flipped (FP32 right -> INT8
wrong / wrong -> right), top-1 agreement and relative logit error against FP32, the float layers' share
of Linear multiply-adds, median latency at batch 1 and 8 (ORT CPU, ORT_ENABLE_ALL, default threads;
PyTorch eager default threads; all variants measured in rotating blocks of consecutive calls, so load
from other processes on a shared machine hits them alike) and batch-1 latency over PyTorch eager.

Usage::

    python bench/bench_precision.py [--ckpt run.pt ...] [--no-proxy] [--runs 30] [--methods minmax,percentile]
        [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

BACKBONE = "vit_small_patch16_224"


def machine() -> dict:
    import os
    import platform
    import subprocess

    import onnx
    import onnxruntime
    import timm
    import torch

    cpu = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()}


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def digits(split: str, n: int | None = None, seed: int = 0):
    """PIL images and labels of atexport.data's digits split (a seeded subset of n when given)."""
    from atexport.data import load_dataset

    ds = load_dataset("digits", split, size=64, val_fraction=0.0) if split == "train" else load_dataset("digits", split, size=64)
    idx = range(len(ds)) if n is None or n >= len(ds) else sorted(np.random.default_rng(seed).permutation(len(ds))[:n])
    pairs = [ds[i] for i in idx]
    return [p[0] for p in pairs], np.array([p[1] for p in pairs])


def make_proxy_checkpoint(folder: Path, x_train, y_train):
    """Adapters (random, non-zero) + a head fitted by logistic regression on the adapted features."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from atexport.adapter import AdapterConfig, inject_adapters
    from atexport.checkpoint import Checkpoint, save_checkpoint, trainable_state
    from atexport.models import ModelSpec, backbone_fingerprint, create_backbone, preprocess_config

    spec = ModelSpec(backbone=BACKBONE, num_classes=10, source={"kind": "random", "seed": 0},
                     class_names=[str(i) for i in range(10)])
    model = create_backbone(spec)
    fp = backbone_fingerprint(model)
    cfg = AdapterConfig(rank=16, every=1)
    inject_adapters(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter.up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    feats = []
    with torch.inference_mode():
        for i in range(0, len(x_train), 32):
            f = model.forward_features(torch.from_numpy(x_train[i:i + 32]))
            feats.append(model.forward_head(f, pre_logits=True).numpy())
    feats = np.concatenate(feats)
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    clf = LogisticRegression(max_iter=3000, C=1.0).fit((feats - mu) / sd, y_train)
    w = clf.coef_ / sd
    b = clf.intercept_ - (clf.coef_ * (mu / sd)).sum(1)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(w).float())
        model.head.bias.copy_(torch.from_numpy(b).float())
    ck = Checkpoint(model=spec, adapter=cfg, regime="adapter", fingerprint=fp,
                    state_dict=trainable_state(model, "adapter"), preprocess=preprocess_config(model))
    return save_checkpoint(ck, folder / "proxy.pt")


def run_all(infer, x, bs=8):
    return np.concatenate([infer(x[i:i + bs]) for i in range(0, len(x), bs)])


def interleaved_latency(runners: dict, x, runs: int, block: int = 10, warm: int = 2) -> dict:
    """Median ms per call of every runner on ``x``, measured in rotating blocks: each round runs every
    runner for ``warm`` + ``block`` consecutive calls (the warm ones discarded), until ``runs`` timed calls
    each. Load from other processes on a shared machine then hits every variant alike, and the previous
    runner's spinning worker threads (ORT's and PyTorch's OpenMP pools both spin after a call: measured
    here, eager right after an ORT call ran 3x slower) are out of the timed calls."""
    names = list(runners)
    times = {n: [] for n in names}
    k = 0
    while min(len(t) for t in times.values()) < runs:
        for n in names[k % len(names):] + names[:k % len(names)]:
            for i in range(warm + block):
                t0 = time.perf_counter()
                runners[n].infer(x)
                if i >= warm:
                    times[n].append((time.perf_counter() - t0) * 1000)
        k += 1
    return {n: statistics.median(t) for n, t in times.items()}


def fused_ops(path) -> dict:
    import onnx
    import onnxruntime as ort

    from atexport.runtime.onnxruntime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        c = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    keep = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QuantizeLinear",
            "DequantizeLinear", "MatMul", "FusedMatMul", "Gemm")
    return {k: c[k] for k in keep if c.get(k)}


def variants(fp32: Path, folder: Path, methods, extras: bool) -> dict:
    """The precision models of one FP32 model: name -> (path, keep-float metadata or None, seconds)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from atexport.export.precision import Int8Options, linear_nodes, quantize_int8, to_fp16
    from atexport.artifact.metadata import read_onnx_metadata

    out = {}

    def q(name, **kw):
        t0 = time.perf_counter()
        path = folder / f"{fp32.stem}.{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}.onnx"
        if path.exists():  # --workdir: made by an earlier run (calibration and sensitivity are cached anyway)
            path.unlink()
        r = quantize_int8(fp32, path, "digits", verify=False, options=Int8Options(**kw))
        kf = read_onnx_metadata(onnx.load(str(r.path))).extra["precision"].get("keep_float")
        out[name] = (r.path, kf, time.perf_counter() - t0)
        say(f"  {name}: {time.perf_counter() - t0:.0f}s" + (f", float {kf['layers']}" if kf else ""))

    for m in methods:
        q(f"int8 {m}, all Linear", method=m, keep_float="none", cache=folder / f"{fp32.stem}.{m}.calib.json")
    q("int8 minmax, keep-float auto", method="minmax", keep_float="auto", cache=folder / f"{fp32.stem}.minmax.calib.json")
    q("int8 minmax, keep-float head+adapters", method="minmax", keep_float="head,*.adapter.*",
      cache=folder / f"{fp32.stem}.minmax.calib.json")
    if extras:
        out["fp16"] = (to_fp16(fp32, folder / f"{fp32.stem}.fp16.onnx", verify=False).path, None, 0.0)
        q("int8 minmax, all Linear, cpu target (U8S8)", method="minmax", keep_float="none", target="cpu",
          cache=folder / f"{fp32.stem}.cpu.calib.json")
        q("int8 all ops (counter-example)", method="minmax", op_policy="all", cache=False)
        plain, _ = linear_nodes(onnx.load(str(fp32)))
        dyn = folder / f"{fp32.stem}.dyn.onnx"
        quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8, nodes_to_quantize=plain,
                         op_types_to_quantize=["MatMul", "Gemm"])
        out["int8 dynamic (MatMulInteger)"] = (dyn, None, 0.0)
    return out


def bench_model(label: str, ckpt: Path, folder: Path, imgs, y, args, extras: bool) -> dict:
    """Every variant of one checkpoint: accuracy on the digits test split and latency."""
    import onnx

    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.export.onnx import export_onnx
    from atexport.export.precision import logit_error
    from atexport.artifact.metadata import read_onnx_metadata
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.preprocess import Preprocessor
    from atexport.runtime.torch import TorchRunner

    say(f"[{label}] exporting {ckpt} ...")
    stem = "".join(c if c.isalnum() else "_" for c in label.split(":")[0] + "_" + Path(ckpt).parent.name)
    fp32 = folder / f"{stem}.onnx"
    if not fp32.exists():
        fp32 = export_onnx(ckpt, fp32).path
    meta = read_onnx_metadata(onnx.load(str(fp32)))
    x = Preprocessor(meta.preprocess)(imgs)
    models = variants(fp32, folder, args.methods, extras)
    runners = {"pytorch fp32 (eager)": (TorchRunner(build_model(load_checkpoint(ckpt))), None, None),
               "ort fp32": (OnnxRuntimeRunner(str(fp32)), fp32, None)}
    for name, (path, kf, _) in models.items():
        runners[f"ort {name}"] = (OnnxRuntimeRunner(str(path)), path, kf)
    rows, ref = [], None
    for name, (runner, path, kf) in runners.items():
        runner.activate()
        logits = run_all(runner.infer, x)
        if name == "ort fp32":
            ref = logits
        rows.append({"variant": name, "logits": logits,
                     "float_layers": (kf or {}).get("layers"), "float_share": (kf or {}).get("float_share", 0.0),
                     "fused": fused_ops(path) if path is not None and name != "ort fp32" else {}})
        say(f"  {name}: top-1 {(logits.argmax(1) == y).mean():.2%}")
    live = {name: r for name, (r, _, _) in runners.items()}
    say(f"  latency: {args.runs} calls at batch 1 and {max(10, args.runs // 3)} at batch 8, rotating blocks ...")
    b1 = interleaved_latency(live, x[:1], args.runs)
    b8 = interleaved_latency(live, x[:8], max(10, args.runs // 3), block=5, warm=1)
    for r in live.values():
        r.deactivate()
    for row in rows:
        row.update(b1_ms=b1[row["variant"]], b8_ms=b8[row["variant"]])
    eager = rows[0]["b1_ms"]
    ok_ref = ref.argmax(1) == y
    for row in rows:
        lg = row.pop("logits")
        ok = lg.argmax(1) == y
        err = logit_error(ref, lg)
        row.update(acc=float(ok.mean()), delta_pt=float(100 * (ok.mean() - ok_ref.mean())),
                   lost=int((ok_ref & ~ok).sum()), gained=int((~ok_ref & ok).sum()),
                   agree=err["top1_agreement"], rel_error=err["rel_error"], ratio=row["b1_ms"] / eager)
    return {"label": label, "ckpt": str(ckpt), "backbone": meta.backbone if hasattr(meta, "backbone") else None,
            "input": meta.input.get("shape"), "test_images": int(len(y)), "rows": rows}


def table(res: dict) -> str:
    lines = [f"### {res['label']} (input {res['input']}, {res['test_images']} digits-test images)\n",
             "| variant | top-1 | vs fp32 | flips (lost/gained) | top-1 agr. | rel. logit err. | float MACs | b1 ms | b8 ms | b1 / eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['acc']:.2%} | {r['delta_pt']:+.2f} pt | {r['lost']}/{r['gained']} | "
                     f"{r['agree']:.2%} | {r['rel_error']:.4f} | {r['float_share']:.1%} | {r['b1_ms']:.1f} | "
                     f"{r['b8_ms']:.1f} | {r['ratio']:.2f}x |")
    kept = [r for r in res["rows"] if r.get("float_layers")]
    for r in kept:
        lines.append(f"\n- {r['variant']}: float layers {', '.join(r['float_layers'])}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", default=[], help="a trained run.pt (repeatable)")
    ap.add_argument("--no-proxy", action="store_true", help="skip the random-backbone proxy")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--train", type=int, default=600, help="training images of the proxy's fitted head")
    ap.add_argument("--methods", default="minmax,percentile", help="calibration methods of the all-Linear rows")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="keep models, calibration and sensitivity caches here and "
                    "reuse them on the next run (default: a new temporary folder)")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]

    mach = machine()
    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-precision-"))
    folder.mkdir(parents=True, exist_ok=True)
    imgs, y = digits("test")
    results = []
    if not args.no_proxy:
        import timm

        from atexport.models import preprocess_config
        from atexport.runtime.preprocess import Preprocessor

        t0 = time.perf_counter()
        ckpt = folder / "proxy.pt"
        if not ckpt.exists():
            tr_imgs, y_tr = digits("train", args.train)
            pre = preprocess_config(timm.create_model(BACKBONE, pretrained=False))
            ckpt = make_proxy_checkpoint(folder, Preprocessor(pre)(tr_imgs), y_tr)
            say(f"proxy head fitted in {time.perf_counter() - t0:.0f}s")
        results.append(bench_model("proxy: vit_small 224, random backbone, fitted head", ckpt, folder, imgs, y, args,
                                   extras=True))
    for i, c in enumerate(args.ckpt):
        results.append(bench_model(f"trained: {Path(c).parent.name}/{Path(c).name}", Path(c), folder, imgs, y, args,
                                   extras=False))
    out = {"machine": mach, "results": results, "runs": args.runs, "methods": args.methods}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Machine: {mach['cpu']}, {mach['nproc']} cores, no GPU; {mach['date']}. Python {mach['python']}, "
          f"torch {mach['torch']}, timm {mach['timm']}, onnx {mach['onnx']}, onnxruntime {mach['onnxruntime']}. "
          f"Load average at start {', '.join(f'{v:.1f}' for v in mach['load_avg'])}, at end {load}.\n")
    for res in results:
        print(table(res) + "\n")
    proxy = [r for r in results if r["label"].startswith("proxy")]
    if proxy:
        print("ORT's optimised graphs (fused op counts), proxy:\n")
        for r in proxy[0]["rows"][2:]:
            print(f"- {r['variant']}: {r['fused']}")


if __name__ == "__main__":
    main()
