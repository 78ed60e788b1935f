"""atexport's INT8 next to the quantizers users reach for instead, on the same FP32 ONNX models (not a test).

Quantizers, each calibrated on the same 256 images of the digits training pool (``calibration/digits.yaml``):

* **atexport** (``quantize_int8``, the preset: Linear-only Q/DQ, per-channel weights, SmoothQuant folding where
  a LayerNorm's channels are uneven, sensitivity keep-float ``auto``), as S8S8 (``--target tensorrt``) and U8S8
  (``--target cpu``); and **atexport naive** (no smoothing, every Linear layer quantized) to show what the
  preset buys;
* **NNCF** ``nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER)`` on the OpenVINO model read
  from the FP32 ONNX file (what Intel users do), and on the ONNX model (NNCF's ONNX backend, runnable in ORT);
* **ORT** ``onnxruntime.quantization.quantize_static`` with its defaults (QDQ, all ops, per-tensor).

Models: the ``--ckpt`` checkpoints (e.g. the quickstart's ``runs/quickstart/run.pt``), each also with massive
activations put into its backbone (``atexport.models.inject_activation_outliers``, factor 50: the FP32 function
is unchanged, as the export's parity check shows), and with ``--vit-small`` a vit_small 224 (random backbone and
adapters: scored by agreement with FP32 only). Columns: top-1 on the digits *test* split (359 images), top-1
agreement and relative logit error against ORT FP32, median latency at batch 1 and 8 in ONNX Runtime and
OpenVINO (INT8 with the float parts in FP32, and in BF16 where the CPU has AMX), all variants in rotating
blocks of calls in one process.

Usage::

    python bench/bench_quantizers.py --ckpt runs/quickstart/run.pt [--vit-small] [--runs 20] [--workdir DIR]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import digits_test, interleaved_latency, machine, proxy_checkpoint, say  # noqa: E402


class Fn:
    """The smallest runner: ``infer(x)``, for sessions of files that carry no atexport metadata."""

    def __init__(self, fn):
        self.infer = fn


def ort_fn(path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def ov_fn(model, hint: str):
    import openvino as ov

    core = ov.Core()
    m = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    req = core.compile_model(m, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}).create_infer_request()
    return lambda x: np.array(req.infer({0: x})[0])


def outlier_checkpoint(ckpt: Path, folder: Path, factor: float = 50.0) -> Path:
    """``ckpt`` with massive activations in its backbone (same adapters and head, same FP32 function)."""
    from safetensors.torch import save_file

    from atexport.checkpoint import load_checkpoint, save_checkpoint
    from atexport.models import backbone_fingerprint, create_backbone, inject_activation_outliers

    ck = load_checkpoint(ckpt)
    backbone = create_backbone(ck.model)
    inject_activation_outliers(backbone, factor=factor)
    weights = folder / "outlier_backbone.safetensors"
    save_file(backbone.state_dict(), str(weights))
    ck.model.source = {"kind": "file", "path": str(weights)}
    ck.fingerprint = backbone_fingerprint(backbone)
    return save_checkpoint(ck, folder / "outlier.pt")


def calibration(preprocess) -> np.ndarray:
    from atexport.export.precision.calibration import load_calibration_set

    return load_calibration_set("digits").batch(preprocess)


def quantize_all(fp32: Path, folder: Path, calib: np.ndarray, reuse: bool = False) -> dict:
    """``{name: (onnx path or None, openvino model or None)}`` for every quantizer.

    With ``reuse``, models this script wrote to ``folder`` before are read back instead of quantized again (to
    re-measure latency on a quiet machine without the quantizers' minutes).
    """
    import nncf
    import onnx
    import openvino as ov
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from atexport.export.precision import Int8Options, quantize_int8

    out = {"FP32": (fp32, None)}
    for name, kw in (("atexport S8S8", {}), ("atexport U8S8", {"target": "cpu"}),
                     ("atexport naive S8S8", {"smooth": "off", "keep_float": "none"})):
        path = folder / f"{name.replace(' ', '_')}.onnx"
        if not (reuse and path.exists()):
            t0 = time.perf_counter()
            r = quantize_int8(fp32, path, calib, verify=False, options=Int8Options(cache=False, **kw))
            say(f"{name}: {time.perf_counter() - t0:.1f}s; " + r.summary().replace("\n", " | "))
        out[name] = (path, None)
    inp = onnx.load(str(fp32)).graph.input[0].name
    items = [calib[i : i + 1] for i in range(len(calib))]
    if not (reuse and (folder / "nncf_ov.xml").exists()):
        t0 = time.perf_counter()
        qov = nncf.quantize(ov.Core().read_model(str(fp32)), nncf.Dataset(items),
                            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
        say(f"NNCF (OpenVINO): {time.perf_counter() - t0:.1f}s")
        ov.save_model(qov, str(folder / "nncf_ov.xml"), compress_to_fp16=False)
    out["NNCF TRANSFORMER (OpenVINO)"] = (None, ov.Core().read_model(str(folder / "nncf_ov.xml")))
    if not (reuse and (folder / "nncf.onnx").exists()):
        t0 = time.perf_counter()
        qonnx = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset([{inp: x} for x in items]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
        onnx.save(qonnx, str(folder / "nncf.onnx"))
        say(f"NNCF (ONNX): {time.perf_counter() - t0:.1f}s")
    out["NNCF TRANSFORMER (ONNX)"] = (folder / "nncf.onnx", None)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(items)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {inp: x}

    if not (reuse and (folder / "ort.onnx").exists()):
        t0 = time.perf_counter()
        quantize_static(str(fp32), str(folder / "ort.onnx"), Reader())
        say(f"ORT quantize_static: {time.perf_counter() - t0:.1f}s")
    out["ORT quantize_static (defaults)"] = (folder / "ort.onnx", None)
    return out


def bench_model(label: str, ckpt: Path, folder: Path, args, amx: bool) -> dict:
    from atexport.checkpoint import load_checkpoint
    from atexport.export.onnx import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    exp = export_onnx(ckpt, folder / "fp32.onnx")  # parity-checked against PyTorch (the outlier model too)
    say(f"{label}: FP32 ONNX vs PyTorch max abs {max(r.max_abs for r in exp.parity):.3g}")
    pre = load_checkpoint(ckpt).preprocess
    x, y = digits_test(pre)
    models = quantize_all(exp.path, folder, calibration(pre), reuse=args.reuse)
    fns = {}
    for name, (path, ovm) in models.items():
        if path is not None:
            fns[f"{name} | ORT"] = ort_fn(path)
        fns[f"{name} | OpenVINO"] = ov_fn(ovm if ovm is not None else path, "f32")
        if amx:
            fns[f"{name} | OpenVINO +BF16"] = ov_fn(ovm if ovm is not None else path, "bf16")
    logits = {k: np.concatenate([f(x[i : i + 1]) for i in range(len(x))]) for k, f in fns.items()}
    ref = logits["FP32 | ORT"]
    rows = {}
    for k, lg in logits.items():
        d = lg - ref
        rel = float(np.linalg.norm(d - d.mean(1, keepdims=True)) / np.linalg.norm(ref - ref.mean(1, keepdims=True)))
        rows[k] = {"top1": float((lg.argmax(1) == y).mean()), "agreement": float((lg.argmax(1) == ref.argmax(1)).mean()),
                   "rel_error": rel}
    for bs in (1, 8):
        lat = interleaved_latency({k: Fn(f) for k, f in fns.items()}, np.ascontiguousarray(x[:bs]), args.runs)
        for k, v in lat.items():
            rows[k][f"ms_b{bs}"] = v
    return {"label": label, "images": int(len(y)), "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']['line']}", f"Date: {res['date']}", ""]
    for m in res["models"]:
        lines += [f"### {m['label']} ({m['images']} test images)", "",
                  "| quantizer | engine | top-1 | agreement | rel. logit error | ms b1 | ms b8 |", "|---|---|---|---|---|---|---|"]
        for k, r in m["rows"].items():
            q, eng = k.split(" | ")
            lines.append(f"| {q} | {eng} | {r['top1']:.2%} | {r['agreement']:.2%} | {r['rel_error']:.4f} | "
                         f"{r['ms_b1']:.2f} | {r['ms_b8']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", action="append", default=[], help="Trained checkpoint(s); repeatable.")
    ap.add_argument("--vit-small", action="store_true", help="Add vit_small 224 (random backbone and adapters).")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--workdir", default="runs/bench_quantizers")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="Read back the quantized models an earlier run left in --workdir (latency on a quiet machine).")
    args = ap.parse_args()
    m = machine()
    amx = "amx" in m["line"].lower() or "amx_bf16" in json.dumps(m).lower()
    work = Path(args.workdir)
    res = {"machine": m, "date": time.strftime("%Y-%m-%d %H:%M"), "models": []}
    for c in args.ckpt:
        name = Path(c).parent.name or Path(c).stem
        res["models"].append(bench_model(name, Path(c), work / name, args, amx))
        folder = (work / f"{name}_outliers").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        ol = outlier_checkpoint(Path(c), folder)
        res["models"].append(bench_model(f"{name} + activation outliers (x50)", ol, work / f"{name}_outliers", args, amx))
    if args.vit_small:
        (work / "vit_small").mkdir(parents=True, exist_ok=True)
        res["models"].append(bench_model("vit_small 224 (random backbone, agreement only)",
                                         proxy_checkpoint(work / "vit_small"), work / "vit_small", args, amx))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(markdown(res))


if __name__ == "__main__":
    main()
