"""Adapter families on the digits transfer task: accuracy, trainable parameters, ORT latency, INT8 loss.

The backbone (a 4-block, 128-wide ViT) is pretrained on every weight on digits 0-4
(``bench/transfer_task.py``, shared with the rank sweep); each family then trains on digits 5-9 with
that backbone frozen (head-only and full fine-tuning as the two ends), 3 seeds each: mean +- std test
top-1 (sample std, ddof 1). On the seed-0 checkpoint of each: the fused FP32 ONNX export (parity-checked
by the exporter), its ONNX Runtime batch-1 median latency against the bare backbone (the head-only
export: backbone + head, no adapters; all models timed in rotating blocks so machine load hits them
alike), and the INT8 model (``quantize_int8``, the preset's keep-float policy, calibrated on the task's
training images) scored on the same test images. For Adapter-X, the routing near-ties (gap between the
top-2 probabilities per sub-token) on the test images.

    python bench/bench_families.py -o runs/bench_families      # ~10-15 min on 2 busy CPU cores
    python bench/bench_families.py --arms adapterx,adapterx-layout1,head-only   # a subset (own section)

Parameters are also given as % of the backbone (every weight but the head), next to the paper budgets:
Adapter-X 0.20% of ViT-B (:data:`PAPER_BUDGETS`; the bench's ViT is 0.8M, so the shares are not comparable
in size, only the per-family formulas are: ``atexport train`` prints the count for any backbone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer_task import build_transfer_backbone  # noqa: E402

TASK = dict(epochs=6, warmup_epochs=1, batch_size=64, lr=1e-2, weight_decay=0.05, scale=[0.85, 1.0],
            ratio=[0.9, 1.1], hflip=0.0, workers=0, val_fraction=0.1)
RANK = 8
# name -> TrainConfig keys (regime, adapter family and its keys, lr)
ARMS = {
    "adaptertune": dict(regime="adapter", rank=RANK),
    "adaring": dict(regime="adapter", rank=RANK, adapter={"kind": "adaring", "ring_rank": 4}),
    "adapterx": dict(regime="adapter", rank=RANK, adapter={"kind": "adapterx", "experts": 4}),  # paper layout (2)
    "adapterx-layout1": dict(regime="adapter", rank=RANK, adapter={"kind": "adapterx", "experts": 4, "layout": 1}),
    "lora": dict(regime="adapter", rank=RANK, adapter={"kind": "lora", "lora_alpha": float(RANK)}),
    "head-only": dict(regime="head"),
    "full": dict(regime="full", lr=1e-3),
}
PAPER_BUDGETS = {"adapterx": "0.20% of ViT-B (paper)", "adaring": "not given for ViT classification"}
VIT_B_BACKBONE = 85_798_656  # vit_base_patch16_224 without its head


def _markers(arms) -> tuple[str, str]:
    tag = "bench_families" if arms is None else "bench_families:" + ",".join(arms)
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def vit_b_share(name: str) -> str:
    """The arm's adapter count on ViT-B (D 768, 12 blocks, rank 16) as % of the backbone, from the family's
    formula (what the code computes, not a measurement)."""
    arm = ARMS[name]
    if arm.get("regime") != "adapter":
        return "-"
    from atexport.training import TrainConfig

    cfg = TrainConfig.from_dict({"dataset": "digits", **arm, "rank": 16}).adapter_config()
    n = cfg.num_params(768, 12)
    return f"{n:,} = {100 * n / VIT_B_BACKBONE:.3f}%"


def _test_batch(dataset: str, preprocess: dict):
    from atexport.data import load_splits
    from atexport.runtime.preprocess import Preprocessor

    ds = load_splits(dataset, ["test"], val_fraction=0.1)["test"]
    imgs, labels = zip(*(ds[i] for i in range(len(ds))))
    return Preprocessor(preprocess)(list(imgs)), np.asarray(labels)


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _top1(sess, x, y) -> float:
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return 100.0 * float((logits.argmax(-1) == y).mean())


def _latency(paths: dict, x1, rounds: int, calls: int) -> dict:
    """Median batch-1 latency (ms) per model, timed in rotating blocks of ``calls`` consecutive calls."""
    sessions = {k: _session(p) for k, p in paths.items()}
    times = {k: [] for k in paths}
    for s in sessions.values():  # warm-up
        for _ in range(5):
            s.run(None, {s.get_inputs()[0].name: x1})
    for _ in range(rounds):
        for k, s in sessions.items():
            name = s.get_inputs()[0].name
            for _ in range(calls):
                t = time.perf_counter()
                s.run(None, {name: x1})
                times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def _routing(ckpt_path, x) -> dict:
    import torch

    from atexport.adapters.adapterx import RoutingProbe, routing_margins
    from atexport.checkpoint import build_model, load_checkpoint

    probe = RoutingProbe(build_model(load_checkpoint(ckpt_path))).eval()
    with torch.no_grad():
        _, *probs = probe(torch.from_numpy(x[:128]))  # per routed block (token counts differ with prompts)
    return routing_margins(np.concatenate([p.numpy().reshape(-1, p.shape[-1]) for p in probs]))


def run(out: Path, seeds: str, epochs: int, rounds: int, calls: int, transfer: Path | None = None, log=print,
        arms=None) -> dict:
    from atexport.export.onnx import export_onnx
    from atexport.export.precision import Int8Options, quantize_int8
    from atexport.training import TrainConfig, train

    t0 = time.perf_counter()
    task = build_transfer_backbone(transfer or out / "transfer", seed=0, log=log)
    results: dict = {"task": {k: task[k] for k in ("task_dataset", "pretrain_top1")}, "arms": {}}
    calib_dir = Path(task["task_dataset"].split(":", 1)[1]) / "train"
    for name, arm in ARMS.items():
        if arms is not None and name not in arms:
            continue
        cfg = TrainConfig.from_dict({**TASK, **task["train_args"], **arm, "dataset": task["task_dataset"],
                                     "epochs": epochs, "seeds": seeds, "output": str(out / name),
                                     "overwrite": True, "progress": False})
        t = time.perf_counter()
        res = train(cfg, log=lambda s: None)
        first = res.runs[0]
        p = first.metrics["params"]
        results["arms"][name] = {
            "top1": res.summary["test_top1"], "train_s": round(time.perf_counter() - t, 1),
            "trainable": p["trainable"], "adapters": p["adapters"], "head": p["head"],
            "backbone": p["full_finetune"] - p["head"],
            "formula": p.get("formula"), "checkpoint": str(first.checkpoint),
        }
        log(f"{name}: test top-1 {res.summary['test_top1']['mean']:.2f} +- {res.summary['test_top1']['std']:.2f}  "
            f"trainable {p['trainable']:,}  ({time.perf_counter() - t:.0f} s)")

    onnx_paths, x, y = {}, None, None
    for name, r in results["arms"].items():
        exp = export_onnx(r["checkpoint"], out / "onnx" / f"{name}.onnx")
        onnx_paths[name] = exp.path
        r["fp32_parity_max_abs"] = max(row.max_abs for row in exp.parity)
        if x is None:
            x, y = _test_batch(task["task_dataset"], exp.metadata.preprocess)
        r["ort_fp32_top1"] = _top1(_session(exp.path), x, y)
        i8 = quantize_int8(exp.path, out / "onnx" / f"{name}.int8.onnx", str(calib_dir), options=Int8Options(count=128))
        r["ort_int8_top1"] = _top1(_session(i8.path), x, y)
        r["int8_loss_pt"] = r["ort_fp32_top1"] - r["ort_int8_top1"]
        r["int8_keep_float"] = (i8.metadata.extra.get("precision") or {}).get("keep_float")
        if name.startswith("adapterx"):
            r["routing"] = _routing(r["checkpoint"], x)
        log(f"{name}: ORT FP32 {r['ort_fp32_top1']:.2f}%  INT8 {r['ort_int8_top1']:.2f}%")
    lat = _latency(onnx_paths, x[:1], rounds, calls)
    base = lat["head-only"]
    for name, r in results["arms"].items():
        r["latency_ms"] = lat[name]
        r["overhead_pct"] = 100.0 * (lat[name] / base - 1.0)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    return results


def _pct(v) -> str:
    return "?" if v is None else f"{v:.2f}%"


def markdown(res: dict, machine: str, command: str, date: str, arms=None) -> str:
    start, end = _markers(arms)
    rows = [
        "| family | trainable params (adapters + head) | adapters % of backbone | same family on ViT-B, r 16 "
        "(formula) | paper budget | test top-1 % (mean +- std, 3 seeds) | ORT FP32 batch-1 ms "
        "| overhead vs backbone | INT8 top-1 % (loss, pt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["arms"].items():
        t = r["top1"]
        split = (f"{r['adapters']:,} + {r['head']:,}" if r["adapters"] + r["head"] == r["trainable"]
                 else "every weight")
        share = f"{100 * r['adapters'] / r['backbone']:.2f}%" if r.get("backbone") else "?"
        rows.append(
            f"| {name} | {r['trainable']:,} ({split}) | {share} | {vit_b_share(name)} "
            f"| {PAPER_BUDGETS.get(name.split('-')[0], '-') if name != 'adapterx-layout1' else '-'} "
            f"| {t['mean']:.2f} +- {t['std']:.2f} "
            f"| {r['latency_ms']:.3f} | {r['overhead_pct']:+.1f}% | {r['ort_int8_top1']:.2f} ({r['int8_loss_pt']:+.2f}) |"
        )
    rx = res["arms"].get("adapterx", {}).get("routing")
    title = ("## Adapter families on the digits transfer task (issue 14; Adapter-X in its paper layout since issue 19)"
             if arms is None else f"## Adapter families on the digits transfer task: {', '.join(arms)} (issue 19)")
    lines = [
        start,
        title,
        "",
        f"Backbone: `bench/transfer_task.py` pretrains a 4-block, 128-wide ViT (32 px, patch 8) on every weight on "
        f"digits 0-4 ({_pct(res['task']['pretrain_top1'])} test top-1, `bench/transfer_task.py`); each family then "
        "trains on digits 5-9 with the backbone frozen (head-only and full fine-tuning at the two ends), rank 8 "
        "(AdaRing ring rank 4; Adapter-X 4 experts, `adapterx` its paper layout (shared router, 4 sub-tokens, "
        "trainable norm2 and CLS, prompt tokens), `adapterx-layout1` atexport's earlier one; LoRA on q and v, "
        "alpha 8, merged at export), the same "
        "schedule for all (lr 1e-2, full fine-tuning 1e-3), 3 seeds. Latency: ONNX Runtime CPU, fused FP32 "
        "export of the seed-0 checkpoint, batch 1, median of rotating blocks; the bare backbone is the "
        "head-only model. INT8: `quantize_int8` with the preset's keep-float policy, calibrated on 128 of the "
        "task's training images, scored on the same test images as ORT FP32 (seed-0 checkpoints; the FP32 "
        "top-1 of those is in bench_families.json). A short schedule (see the command) on a shared, loaded "
        "machine: the numbers compare the families on one footing, they are not tuned accuracies.",
        "",
        *rows,
        "",
    ]
    if rx:
        lines += [
            f"Adapter-X (paper layout) routing on {rx['tokens']:,} test sub-tokens (4 blocks): top-2 probability gap min "
            f"{rx['min_gap']:.2e}, median {rx['median_gap']:.3f}; {100 * rx['below_1e-3']:.2f}% of gaps below 1e-3 "
            f"and {100 * rx['below_1e-2']:.2f}% below 1e-2 (where FP16/INT8 can flip the expert).",
            "",
        ]
    lines += [
        "Trainable-parameter formulas (adapters, per family): "
        + "; ".join(f"{n}: {r['formula']}" for n, r in res["arms"].items() if r.get("formula")) + ".",
        "",
        f"Machine: {machine}. Date: {date}. Command: `{command}` ({res['wall_s'] / 60:.1f} min).",
        end,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="runs/bench_families")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=TASK["epochs"])
    ap.add_argument("--transfer", default=None, help="Folder of an existing transfer-task build to reuse "
                    "(bench/transfer_task.py; e.g. the rank sweep's) [OUTPUT/transfer].")
    ap.add_argument("--arms", default=None, help=f"Comma-separated subset of {', '.join(ARMS)} (written to its "
                    "own section of RESULTS.md) [all].")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"),
                    help="RESULTS.md whose families section is written (replaced between its markers).")
    a = ap.parse_args(argv)

    from atexport.utils.io import atomic_write_json, atomic_write_text
    from atexport.utils.machine import describe_machine, machine_line

    out = Path(a.output)
    arms = None if not a.arms else [s.strip() for s in a.arms.split(",") if s.strip()]
    unknown = sorted(set(arms or []) - set(ARMS))
    if unknown:
        ap.error(f"unknown arms {unknown}; they are {', '.join(ARMS)}")
    if arms is not None and "head-only" not in arms:
        arms.append("head-only")  # the latency baseline
    res = run(out, a.seeds, a.epochs, a.rounds, a.calls, Path(a.transfer) if a.transfer else None, arms=arms)
    m = describe_machine()
    res["machine"] = m
    command = "python bench/bench_families.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["command"] = command.strip()
    atomic_write_json(out / "bench_families.json", res)
    section = markdown(res, machine_line(m), res["command"], time.strftime("%Y-%m-%d"), arms)
    start, end = _markers(arms)
    path = Path(a.results)
    text = path.read_text() if path.is_file() else ""
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)
    print(section)


if __name__ == "__main__":
    main()
