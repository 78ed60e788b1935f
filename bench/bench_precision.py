"""Benchmark of the precision stage on CPU (not a test): accuracy and ONNX Runtime latency of INT8.

vit_small_patch16_224 with a random-init backbone and rank-16 adapters (no hub weights offline), whose
head is *trained* (logistic regression on the adapted model's features) on scikit-learn's digits, so
top-1 accuracy means something. Measured, side by side in one process:

* accuracy on the digits test split and top-1 agreement with FP32: PyTorch FP32, ORT FP32, ORT FP16,
  ORT INT8 (TensorRT-targeted S8S8 Q/DQ, Linear-only), ORT INT8 (CPU-targeted U8S8), ORT INT8 all-ops
  (the policy's counter-example) and ORT dynamic INT8 (MatMulInteger, no calibration) for reference;
* parity against PyTorch on the real photos (max abs, min cosine, top-1 agreement);
* median latency at batch 1 and 8: PyTorch eager FP32 and each ONNX Runtime model (CPU, ORT_ENABLE_ALL,
  default threads), and the optimised graph's fused op counts (what ORT turned Q/DQ into).

Usage::

    python bench/bench_precision.py [--runs 30] [--train 600] [--test 360] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_export import machine  # noqa: E402

BACKBONE = "vit_small_patch16_224"


def digits_images(split: str, n: int):
    from atexport.export.calibration import load_calibration_set

    cs = load_calibration_set({"name": f"digits-{split}", "source": "digits", "split": split, "count": n, "seed": 0})
    from sklearn.datasets import load_digits

    from atexport.export.calibration import _DIGITS_TRAIN, _select

    labels = load_digits().target
    pool = list(range(_DIGITS_TRAIN)) if split == "train" else list(range(_DIGITS_TRAIN, len(labels)))
    y = np.array([labels[pool[i]] for i in _select(len(pool), n, 0)])
    return cs, y


def make_checkpoint(folder: Path, x_train, y_train):
    """Adapters (random, non-zero) + a head trained by logistic regression on the adapted features."""
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
    return save_checkpoint(ck, folder / "vit_small_digits.pt"), model


def run_all(infer, x, bs=8):
    return np.concatenate([infer(x[i:i + bs]) for i in range(0, len(x), bs)])


def latency(fn, x, runs):
    for _ in range(3):
        fn(x)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        t.append((time.perf_counter() - t0) * 1000)
    return statistics.median(t)


def fused_ops(path) -> dict:
    import onnx

    from atexport.runtime.onnxruntime import session_options

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        c = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    keep = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QuantizeLinear",
            "DequantizeLinear", "MatMul", "FusedMatMul", "Gemm")
    return {k: c[k] for k in keep if c.get(k)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=360)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from atexport.export.onnx import export_onnx
    from atexport.export.precision import linear_nodes, quantize_int8, to_fp16
    from atexport.metadata import read_onnx_metadata
    from atexport.models import preprocess_config
    from atexport.runtime.onnxruntime import OnnxRuntimeRunner
    from atexport.runtime.torch import TorchRunner
    from atexport.verify.compare import Tolerance, compare
    from atexport.verify.parity import photo_batch

    mach = machine()
    folder = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    t0 = time.perf_counter()
    cs_tr, y_tr = digits_images("train", args.train)
    cs_te, y_te = digits_images("test", args.test)
    import timm

    pre = preprocess_config(timm.create_model(BACKBONE, pretrained=False))
    x_tr, x_te = cs_tr.batch(pre), cs_te.batch(pre)
    ckpt, model = make_checkpoint(folder, x_tr, y_tr)
    print(f"trained head in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    fp32 = export_onnx(ckpt, folder / "m.onnx").path
    fp16 = to_fp16(fp32, folder / "m.fp16.onnx", verify=False).path  # parity is measured below, vs PyTorch
    int8 = quantize_int8(fp32, folder / "m.int8.onnx", "digits", verify=False).path  # calibrated on digits-train
    int8_cpu = quantize_int8(fp32, folder / "m.int8-cpu.onnx", "digits", target="cpu", verify=False).path
    int8_all = quantize_int8(fp32, folder / "m.int8-all.onnx", "digits", op_policy="all", verify=False, cache=False).path
    import onnx

    plain, _ = linear_nodes(onnx.load(str(fp32)))
    dyn = folder / "m.dyn.onnx"
    quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8, nodes_to_quantize=plain,
                     op_types_to_quantize=["MatMul", "Gemm"])
    meta = read_onnx_metadata(onnx.load(str(fp32)))
    photos = photo_batch(meta.preprocess)

    runners = {
        "pytorch fp32 (eager)": TorchRunner(model),
        "ort fp32": OnnxRuntimeRunner(str(fp32)),
        "ort fp16": OnnxRuntimeRunner(str(fp16)),
        "ort int8 Q/DQ (tensorrt target, S8S8)": OnnxRuntimeRunner(str(int8)),
        "ort int8 Q/DQ (cpu target, U8S8)": OnnxRuntimeRunner(str(int8_cpu)),
        "ort int8 Q/DQ all ops (counter-example)": OnnxRuntimeRunner(str(int8_all)),
        "ort int8 dynamic (MatMulInteger)": OnnxRuntimeRunner(str(dyn)),
    }
    paths = {"ort fp32": fp32, "ort fp16": fp16, "ort int8 Q/DQ (tensorrt target, S8S8)": int8,
             "ort int8 Q/DQ (cpu target, U8S8)": int8_cpu, "ort int8 Q/DQ all ops (counter-example)": int8_all,
             "ort int8 dynamic (MatMulInteger)": dyn}
    rows = []
    ref_te = ref_ph = None
    for name, r in runners.items():
        with r:
            lt = run_all(r.infer, x_te)
            lp = run_all(r.infer, photos)
            xb1, xb8 = x_te[:1], x_te[:8]
            b1 = latency(r.infer, xb1, args.runs)
            b8 = latency(r.infer, xb8, max(5, args.runs // 3))
        if ref_te is None:
            ref_te, ref_ph = lt, lp
        ph = compare(ref_ph, lp, Tolerance(), name)
        rows.append({
            "variant": name, "acc": float((lt.argmax(1) == y_te).mean()),
            "agree": float((lt.argmax(1) == ref_te.argmax(1)).mean()),
            "photos_max_abs": ph.max_abs, "photos_min_cos": ph.min_cosine, "photos_top1": ph.top1_agreement,
            "b1_ms": b1, "b8_ms": b8, "fused": fused_ops(paths[name]) if name in paths else {},
        })
        print(rows[-1], file=sys.stderr, flush=True)
    eager = rows[0]["b1_ms"]
    out = {"machine": mach, "rows": rows, "train": args.train, "test": args.test, "runs": args.runs}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"## Precision ONNX and INT8 on CPU (issue #4) — {mach['date']}\n")
    print(f"Machine: {mach['cpu']}, {mach['nproc']} cores, no GPU. Python {mach['python']}, torch {mach['torch']}, "
          f"timm {mach['timm']}, onnx {mach['onnx']}, onnxruntime {mach['onnxruntime']}.\n")
    print(f"Command: `python bench/bench_precision.py --runs {args.runs}` ({BACKBONE}, random-init backbone, "
          f"rank-16 adapters, head trained on {args.train} digits-train images; accuracy on {args.test} digits-test "
          "images; INT8 calibrated on 256 digits-train images (minmax); latency median, ORT CPU ORT_ENABLE_ALL, "
          "default threads, PyTorch eager default threads).\n")
    print("| variant | digits acc | top-1 agr. vs fp32 | photos max abs | photos min cos | b1 ms | b8 ms | b1 / eager |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['acc']:.1%} | {r['agree']:.1%} | {r['photos_max_abs']:.3g} | "
              f"{r['photos_min_cos']:.4f} | {r['b1_ms']:.1f} | {r['b8_ms']:.1f} | {r['b1_ms'] / eager:.2f}x |")
    print("\nORT's optimised graphs (fused op counts):\n")
    for r in rows[1:]:
        print(f"- {r['variant']}: {r['fused']}")


if __name__ == "__main__":
    main()
