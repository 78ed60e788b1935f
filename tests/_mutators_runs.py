"""Seeded mutations of the files of a run folder and a sweep cell, and of an OpenVINO IR's metadata.

The companion of ``tests/_mutators.py`` (same :class:`~_mutators.Format`, :class:`~_mutators.Outcome` and
mutation primitives) for the formats issue 22 found unguarded: ``metrics.jsonl``, a run's ``config.yaml``,
``verify.json`` (each read as ``atexport report`` reads it), a finished sweep cell (``run.pt``,
``config.yaml`` or ``metrics.jsonl`` of the cell damaged, read as ``atexport sweep`` reads it), and the
atexport document in an OpenVINO IR's ``rt_info`` (read and checked against the graph as every OpenVINO
path does). Each mutation loads or ends in atexport's own error.
"""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from _mutators import Format, _dump_json, _tensor_leaf, mutate_bytes, mutate_doc

CELL_BASE = dict(
    dataset="digits", backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
    model_args={"depth": 4, "embed_dim": 64, "num_heads": 2}, epochs=2, warmup_epochs=0, batch_size=16, lr=1e-2,
    workers=0, progress=False,
)


@dataclass
class RunContext:
    """Base files: a finished sweep cell (from a real tiny checkpoint) and an OpenVINO model with metadata."""

    workdir: Path
    cell_cfg: object  # the TrainConfig of the cell
    run_pt: bytes
    config_yaml: str
    metrics_lines: list
    verify: dict
    ov_model: object
    ov_meta: dict


def build_run_context(workdir: Path, ckpt_path: Path, onnx_path: Path) -> RunContext:
    """The cell ``adaptertune_r4_e1/seed_0`` of a sweep whose run.pt is ``ckpt_path`` given that cell's
    config and metrics, and ``onnx_path`` read by OpenVINO (its metadata as a dict)."""
    import torch
    import yaml

    from atexport.analysis.sweep import _cell_config
    from atexport.runtime.openvino import read_metadata, read_ov_model
    from atexport.training import TrainConfig

    workdir = Path(workdir)
    cell = workdir / "base_cell"
    cfg = _cell_config(TrainConfig.from_dict(dict(CELL_BASE)), "adaptertune", 4, 1, 0, cell, 1, 0)
    record = cfg.to_dict(record=True)
    doc = torch.load(ckpt_path, weights_only=True)
    params = {"trainable": 1234, "share": 0.01, "full_finetune": 123400}
    doc["config"], doc["metrics"] = record, {"epoch": 2, "val_top1": 50.0, "test_top1": 55.0, "test_loss": 1.2,
                                             "params": params}
    buf = io.BytesIO()
    torch.save(doc, buf)
    rows = [{"epoch": e, "train_loss": 1.5 / e, "train_top1": 40.0 + e, "val_loss": 1.4, "val_top1": 45.0 + e,
             "lr": 1e-3, "img_per_s": 900.0, "best": True} for e in (1, 2)]
    rows.append({"event": "test", "epoch": 2, "checkpoint": "run.pt", "test_top1": 55.0, "test_top5": 90.0,
                 "test_loss": 1.2})
    verify = {"dataset": "digits", "split": "test", "samples": 32, "passed": True,
              "reference": {"name": "pytorch", "precision": "fp32", "accuracy": 0.5, "agreement": 1.0},
              "backends": [{"name": "onnxruntime", "precision": "int8", "accuracy": 0.46875, "agreement": 0.9375}]}
    ov_model = read_ov_model(onnx_path)
    return RunContext(workdir=workdir, cell_cfg=cfg, run_pt=buf.getvalue(),
                      config_yaml=yaml.safe_dump(record, sort_keys=False), metrics_lines=rows, verify=verify,
                      ov_model=ov_model, ov_meta=read_metadata(ov_model).to_dict())


# ------------------------------------------------------------------------------------------ mutants


def _metrics_text(rows) -> bytes:
    return ("\n".join(json.dumps(r, allow_nan=True) for r in rows) + "\n").encode()


def _metrics_mutant(ctx: RunContext, rng: random.Random):
    rows = copy.deepcopy(ctx.metrics_lines)
    r = rng.random()
    if r < 0.3:
        return mutate_bytes(_metrics_text(rows), rng)
    if r < 0.85:
        i = rng.randrange(len(rows))
        desc, rows[i] = mutate_doc(rows[i], rng)
        return f"line {i + 1}: {desc}", _metrics_text(rows)
    op = rng.choice(["drop", "swap", "duplicate", "reorder"])
    i = rng.randrange(len(rows))
    if op == "drop":
        rows.pop(i)
    elif op == "swap":
        rows[i] = rng.choice([[1, 2], "text", 3, None, []])
    elif op == "duplicate":
        rows.insert(i, copy.deepcopy(rows[i]))
    else:
        rng.shuffle(rows)
    return f"{op} line {i + 1}", _metrics_text(rows)


def _yaml_mutant(ctx: RunContext, rng: random.Random):
    import yaml

    if rng.random() < 0.35:
        return mutate_bytes(ctx.config_yaml.encode(), rng)
    desc, doc = mutate_doc(yaml.safe_load(ctx.config_yaml), rng)
    return desc, yaml.safe_dump(doc, allow_unicode=True).encode()


def _verify_mutant(ctx: RunContext, rng: random.Random):
    if rng.random() < 0.3:
        return mutate_bytes(_dump_json(ctx.verify), rng)
    desc, doc = mutate_doc(ctx.verify, rng)
    return desc, _dump_json(doc)


def _run_pt_mutant(ctx: RunContext, rng: random.Random):
    import torch

    if rng.random() < 0.25:
        return mutate_bytes(ctx.run_pt, rng)
    d = torch.load(io.BytesIO(ctx.run_pt), map_location="cpu", weights_only=True)
    part = rng.choice(["metrics", "metrics", "config", "config", "all"])
    if part == "all":
        desc, d = mutate_doc(d, rng, leaf=_tensor_leaf)
    else:
        desc, d[part] = mutate_doc(d[part], rng)
        desc = f"{part}: {desc}"
    buf = io.BytesIO()
    torch.save(d, buf)
    return desc, buf.getvalue()


def _cell_mutant(ctx: RunContext, rng: random.Random):
    """One damaged file of the cell, as ``name\\0bytes``."""
    name = rng.choice(["run.pt", "run.pt", "config.yaml", "metrics.jsonl"])
    fn = {"run.pt": _run_pt_mutant, "config.yaml": _yaml_mutant, "metrics.jsonl": _metrics_mutant}[name]
    desc, data = fn(ctx, rng)
    return f"{name}: {desc}", name.encode() + b"\0" + data


def _ov_mutant(ctx: RunContext, rng: random.Random):
    if rng.random() < 0.3:
        return mutate_bytes(_dump_json(ctx.ov_meta), rng)
    desc, doc = mutate_doc(ctx.ov_meta, rng)
    return desc, _dump_json(doc)


# ------------------------------------------------------------------------------------------ readers


def _run_folder(ctx: RunContext, name: str, files: dict) -> Path:
    folder = ctx.workdir / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for fname, data in files.items():
        (folder / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


def _report(folder: Path) -> None:
    """What ``atexport report`` does with a run folder before it writes anything."""
    from atexport.analysis.report import read_run, report_markdown, summarize

    run = read_run(folder)
    summary = summarize([run])
    report_markdown(summary, [run], {})
    json.dumps(summary, allow_nan=False)  # report.json must be writable as strict JSON


def read_metrics_file(data: bytes, ctx: RunContext) -> None:
    from atexport.artifact.runfiles import metrics_finished

    folder = _run_folder(ctx, "fuzz_metrics", {"metrics.jsonl": data, "config.yaml": ctx.config_yaml})
    metrics_finished(folder / "metrics.jsonl")
    _report(folder)


def read_config_file(data: bytes, ctx: RunContext) -> None:
    from atexport.analysis.sweep import _check_same_settings

    folder = _run_folder(ctx, "fuzz_config", {"metrics.jsonl": _metrics_text(ctx.metrics_lines), "config.yaml": data,
                                              "run.pt": ctx.run_pt})
    _report(folder)
    _check_same_settings(ctx.cell_cfg, folder, "finished")


def read_verify_file(data: bytes, ctx: RunContext) -> None:
    folder = _run_folder(ctx, "fuzz_verify", {"metrics.jsonl": _metrics_text(ctx.metrics_lines),
                                              "config.yaml": ctx.config_yaml, "verify.json": data})
    _report(folder)


def read_cell(data: bytes, ctx: RunContext) -> None:
    """What ``atexport sweep`` does with a cell it finds on disk: its state, its settings, its summary row."""
    from atexport.analysis.sweep import _check_same_settings, _read_cell, cell_state

    name, _, payload = data.partition(b"\0")
    files = {"run.pt": ctx.run_pt, "last.pt": ctx.run_pt, "config.yaml": ctx.config_yaml,
             "metrics.jsonl": _metrics_text(ctx.metrics_lines)}
    if name:
        files[name.decode()] = payload
    folder = _run_folder(ctx, "fuzz_cell", files)
    state = cell_state(folder)
    _check_same_settings(ctx.cell_cfg, folder, state)
    if state == "finished":
        _read_cell(folder, ctx.cell_cfg)


def read_ov_metadata(data: bytes, ctx: RunContext) -> None:
    """The IR's rt_info document as every OpenVINO path reads it: parsed, validated, checked against the graph."""
    from atexport.runtime.openvino import check_ov_graph, read_metadata

    text = data.decode("utf-8", errors="replace")
    ctx.ov_model.set_rt_info(text, "atexport")
    meta = read_metadata(ctx.ov_model, "model.xml")
    if meta is None:  # an empty document: the IR carries no metadata, which every command refuses
        from atexport.errors import BadInputError

        raise BadInputError("model.xml: no atexport metadata")
    check_ov_graph(meta, ctx.ov_model, "model.xml")


RUN_FORMATS = {
    "metrics_jsonl": Format("metrics_jsonl", _metrics_mutant, read_metrics_file,
                            lambda c: _metrics_text(c.metrics_lines)),
    "run_config": Format("run_config", _yaml_mutant, read_config_file, lambda c: c.config_yaml.encode()),
    "verify_json": Format("verify_json", _verify_mutant, read_verify_file, lambda c: _dump_json(c.verify)),
    "sweep_cell": Format("sweep_cell", _cell_mutant, read_cell, lambda c: b""),
    "openvino_metadata": Format("openvino_metadata", _ov_mutant, read_ov_metadata, lambda c: _dump_json(c.ov_meta)),
}

__all__ = ["RUN_FORMATS", "RunContext", "build_run_context"]
