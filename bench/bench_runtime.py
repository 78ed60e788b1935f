"""Benchmark of the app-facing runtime on CPU (not a test): what an app pays, from import to label.

Measured, on a checkpoint and its exported models:

* cold start in a fresh interpreter: ``import atexport.runtime`` + ``load_model`` (no torch), against
  ``import torch, timm`` alone;
* preprocessing per image: atexport's numpy/Pillow transform against timm's eval transform (same
  numbers, checked here too), on a 512x512 photo and a 64x64 digit;
* end to end (decode + preprocess + infer + softmax/top-k) at 1 and 8 images: ``Model.predict`` with
  the FP32 and INT8 ONNX models, against PyTorch eager with timm's transform;
* the ``atexport bench`` table (model only, preprocessed input) for the same models.

Usage::

    python bench/bench_runtime.py --ckpt runs/digits/run.pt --onnx runs/digits/model.onnx \
        [--onnx-int8 runs/digits/model.int8.onnx] [--runs 30] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cold_start(onnx_path: str, repeats: int = 3) -> dict:
    code_rt = (f"import time; t=time.perf_counter(); import atexport.runtime as r; m=r.load_model({onnx_path!r}); "
               "import sys; print(time.perf_counter()-t, 'torch' in sys.modules)")
    code_torch = "import time; t=time.perf_counter(); import torch, timm; print(time.perf_counter()-t, True)"
    out = {}
    for name, code in (("runtime_import_and_load", code_rt), ("import_torch_timm", code_torch)):
        vals = []
        for _ in range(repeats):
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            secs, torch_loaded = res.stdout.split()
            vals.append(float(secs))
        out[name] = {"median_s": statistics.median(vals), "torch_imported": torch_loaded == "True"}
    return out


def per_image(fn, images, runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        for im in images:
            fn(im)
    return (time.perf_counter() - t0) / (runs * len(images)) * 1000.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--onnx-int8", default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of PyTorch and ONNX Runtime (1: fair on a shared machine; 0: each library's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from PIL import Image
    from skimage import data as skdata

    from atexport.benchmark import BenchSettings, benchmark
    from atexport.utils.machine import describe_machine, machine_line
    from atexport.checkpoint import build_model, load_checkpoint
    from atexport.data import eval_transform, load_dataset
    from atexport.runtime import Preprocessor, load_model
    from atexport.verify.report import bench_markdown

    ck = load_checkpoint(args.ckpt)
    threads = args.threads or None
    if threads:
        torch.set_num_threads(threads)
    res: dict = {"machine": describe_machine(), "checkpoint": args.ckpt, "threads": threads}
    res["cold_start"] = cold_start(args.onnx)

    photo = Image.fromarray(skdata.astronaut())
    digit = load_dataset("digits", "test")[0][0]
    pre, tf = Preprocessor(ck.preprocess), eval_transform(ck.preprocess)
    same = float(np.abs(pre([photo, digit]) - np.stack([tf(photo).numpy(), tf(digit).numpy()])).max())
    res["preprocess_ms"] = {
        "max_abs_diff_vs_timm": same,
        "photo_512_numpy_pillow": per_image(pre.image, [photo], args.runs),
        "photo_512_timm": per_image(tf, [photo], args.runs),
        "digit_64_numpy_pillow": per_image(pre.image, [digit], args.runs),
        "digit_64_timm": per_image(tf, [digit], args.runs),
    }

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        ds = load_dataset("digits", "test")
        for i in range(8):
            p = Path(tmp) / f"d{i}.png"
            ds[i][0].save(p)
            files.append(str(p))
        model = build_model(ck)
        e2e = {}

        def torch_predict(paths):
            from atexport.runtime.preprocess import open_image

            x = torch.stack([tf(open_image(p)) for p in paths])
            with torch.inference_mode():
                return torch.softmax(model(x), -1).topk(5)

        for n in (1, 8):
            e2e[f"pytorch_eager_timm_b{n}"] = per_image(lambda _: torch_predict(files[:n]), [0], args.runs)
        for label, path in (("onnx_fp32", args.onnx), ("onnx_int8", args.onnx_int8)):
            if not path:
                continue
            m = load_model(path, threads=threads)
            m.predict(files)  # warm-up
            for n in (1, 8):
                e2e[f"runtime_{label}_b{n}"] = per_image(lambda _: m.predict(files[:n]), [0], args.runs)
            m.close()
        res["end_to_end_ms_per_call"] = e2e

    b = benchmark(ck, onnx=args.onnx, onnx_int8=args.onnx_int8,
                  settings=BenchSettings(batches="1,8", runs=args.runs, warmup=5, threads=threads))
    res["bench"] = b.to_dict()
    print(f"Machine: {machine_line(res['machine'])}")
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "bench")}, indent=2))
    print(bench_markdown(b))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
