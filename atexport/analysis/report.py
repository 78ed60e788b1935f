"""Reports of finished runs: the paper-style table, training curves, per-backend accuracy.

:func:`build_report` takes run folders (a single run, a ``--seeds`` folder, a sweep: every folder
below that holds ``metrics.jsonl`` and ``config.yaml`` is a run), groups the runs by method (regime,
or adapter family with its rank and placement) and data set, and writes:

- ``report.md``: one row per method, one column per data set, test top-1 as mean +- std over seeds
  (sample std) with the trainable parameters; then, for runs with ``atexport verify`` reports
  (``verify.json`` in the run folder or below it), the accuracy of every backend;
- ``report.json``: the same numbers, and every run's final metrics;
- ``<report>_curves/*.png``: loss and top-1 per epoch of each run (with matplotlib).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from atexport.errors import BadInputError

METRICS, CONFIG = "metrics.jsonl", "config.yaml"


@dataclass
class ReportResult:
    """What :func:`build_report` wrote: ``summary`` (report.json's content), ``files``, ``notes``."""

    summary: dict
    files: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def find_runs(folders) -> list[Path]:
    """Every run folder (``metrics.jsonl`` + ``config.yaml``) at or below the given folders, once each."""
    runs, seen = [], set()
    for f in folders:
        p = Path(os.path.expanduser(str(f)))
        if not p.is_dir():
            raise BadInputError(f"{p}: no such run folder.")
        found = sorted(m.parent for m in p.rglob(METRICS) if (m.parent / CONFIG).is_file())
        if not found:
            raise BadInputError(
                f"{p}: holds no finished or running atexport run ({METRICS} and {CONFIG}); give folders "
                "written by 'atexport train' or 'atexport sweep'."
            )
        for r in found:
            if r.resolve() not in seen:
                seen.add(r.resolve())
                runs.append(r)
    return runs


def read_run(folder: Path) -> dict:
    """A run's config, per-epoch history, final test metrics and parameters, and its verify reports."""
    import yaml

    cfg = yaml.safe_load((folder / CONFIG).read_text()) or {}
    history, test = [], None
    for line in (folder / METRICS).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadInputError(f"{folder / METRICS}: a line is not JSON; the file is damaged.") from None
        if row.get("event") == "test":
            test = row
        elif row.get("event", "epoch") == "epoch":
            history.append(row)
    params = _params(folder)
    verify = []
    for v in sorted(folder.rglob("verify.json")):
        if any((p / METRICS).is_file() for p in v.parents if p != folder and folder in p.parents):
            continue  # belongs to a run nested below this one
        verify.append(_verify_rows(v))
    return {"folder": str(folder), "method": method_of(cfg), "dataset": str(cfg.get("dataset")),
            "backbone": str(cfg.get("backbone")), "seed": cfg.get("seed"), "config": cfg, "history": history,
            "test_top1": test.get("test_top1") if test else None, "test_epoch": test.get("epoch") if test else None,
            "finished": test is not None, "params": params, "verify": verify}


def method_of(cfg: dict) -> str:
    """``adaptertune r16``, ``adaptertune r8 every 2``, ``head only``, ``full fine-tuning``."""
    regime = cfg.get("regime", "adapter")
    if regime == "head":
        return "head only"
    if regime == "full":
        return "full fine-tuning"
    adapter = cfg.get("adapter")
    kind = adapter.get("kind") if isinstance(adapter, dict) and adapter.get("kind") else "adaptertune"
    every = int(cfg.get("every", 1) or 1)
    return f"{kind} r{cfg.get('rank')}" + (f" every {every}" if every != 1 else "")


def _params(folder: Path) -> dict | None:
    run = folder / "run.pt"
    if not run.is_file():
        return None
    from atexport.checkpoint import load_checkpoint

    return (load_checkpoint(run).metrics or {}).get("params")


def _verify_rows(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise BadInputError(f"{path}: not a readable verify report (JSON).") from None
    rows = []
    for b in [d.get("reference"), *(d.get("backends") or [])]:
        if isinstance(b, dict):
            rows.append({"backend": b.get("name"), "precision": b.get("precision"),
                         "accuracy": b.get("accuracy"), "agreement": b.get("agreement")})
    return {"path": str(path), "dataset": d.get("dataset"), "split": d.get("split"), "samples": d.get("samples"),
            "passed": d.get("passed"), "backends": rows}


def _stats(values: list[float]) -> dict:
    import numpy as np

    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": [float(v) for v in values]}


def summarize(runs: list[dict]) -> dict:
    """Group runs by (backbone, method) x data set; mean and std of test top-1 over their seeds."""
    groups: dict = {}
    for r in runs:
        if r["test_top1"] is None:
            continue
        groups.setdefault((r["backbone"], r["method"]), {}).setdefault(r["dataset"], []).append(r)
    datasets = sorted({r["dataset"] for r in runs if r["test_top1"] is not None})
    rows = []
    for (backbone, method), by_ds in sorted(groups.items()):
        cells = {}
        for ds, rs in by_ds.items():
            p = next((x["params"] for x in rs if x["params"]), None) or {}
            seeds = [x["seed"] for x in rs]
            cells[ds] = {**_stats([x["test_top1"] for x in rs]), "seeds": seeds,
                         "repeated_seeds": sorted({s for s in seeds if seeds.count(s) > 1}, key=str),
                         "trainable": p.get("trainable"), "share": p.get("share"),
                         "runs": [x["folder"] for x in rs]}
        rows.append({"backbone": backbone, "method": method, "cells": cells})
    return {"format": "atexport.report", "version": 1, "datasets": datasets, "rows": rows, "std_ddof": 1,
            "unfinished": [r["folder"] for r in runs if r["test_top1"] is None]}


def report_markdown(summary: dict, runs: list[dict], curves: dict) -> str:
    ds = summary["datasets"]
    multi_backbone = len({r["backbone"] for r in summary["rows"]}) > 1
    lines = ["# Results", "", "Test top-1 (%), mean +- std over seeds (n = seeds); trainable parameters "
             "(% of full fine-tuning) below.", "",
             "| " + " | ".join((["backbone"] if multi_backbone else []) + ["method"] + ds) + " |",
             "|" + "---|" * ((1 if multi_backbone else 0) + 1 + len(ds))]
    for row in summary["rows"]:
        cells = []
        for d in ds:
            c = row["cells"].get(d)
            if c is None:
                cells.append("-")
                continue
            s = f"{c['mean']:.2f} +- {c['std']:.2f} (n={c['n']})"
            if c.get("trainable") is not None:
                s += f"<br>{c['trainable']:,} ({100 * c['share']:.2f}%)"
            cells.append(s)
        lines.append("| " + " | ".join(([row["backbone"]] if multi_backbone else []) + [row["method"]] + cells) + " |")
    repeated = [f"{row['method']} on {d} (seeds {c['repeated_seeds']})" for row in summary["rows"]
                for d, c in row["cells"].items() if c["repeated_seeds"]]
    if repeated:
        lines += ["", "Note: the same seed appears in several run folders of " + "; ".join(repeated)
                  + "; each run counts once in its mean and std."]
    verified = [(r, v) for r in runs for v in r["verify"]]
    if verified:
        lines += ["", "## Accuracy per backend (atexport verify)", "",
                  "| run | data set (split, images) | backend | precision | top-1 (%) | agreement with PyTorch (%) |",
                  "|---|---|---|---|---|---|"]
        for r, v in verified:
            for b in v["backends"]:
                acc = f"{100 * b['accuracy']:.2f}" if b.get("accuracy") is not None else "-"
                agr = f"{100 * b['agreement']:.2f}" if b.get("agreement") is not None else "-"
                lines.append(f"| `{r['folder']}` | {v['dataset']} ({v['split']}, {v['samples']}) | {b['backend']} | "
                             f"{b['precision']} | {acc} | {agr} |")
    if curves:
        lines += ["", "## Training curves", ""] + [f"- `{k}`: ![{k}]({v})" for k, v in curves.items()]
    if summary["unfinished"]:
        lines += ["", "Not finished (no test score yet): " + ", ".join(f"`{u}`" for u in summary["unfinished"])]
    return "\n".join(lines) + "\n"


def build_report(run_dirs, output: str | os.PathLike = "report.md", curves: bool = True) -> ReportResult:
    """The report of finished runs; see the module docstring for what is written.

    Args:
        run_dirs: run folders (single runs, ``--seeds`` folders, sweeps).
        output: the Markdown report; ``report.json`` and the curves folder go beside it.
        curves: draw a loss/top-1 figure per run (needs matplotlib).

    Returns:
        A :class:`ReportResult`.
    """
    from atexport.analysis.plots import NO_PLOT, plot_curves
    from atexport.utils.io import atomic_write_json, atomic_write_text, check_writable

    if not run_dirs:
        raise BadInputError("give at least one run folder, e.g. atexport report runs/pets runs/cifar10.")
    out = check_writable(Path(os.path.expanduser(str(output))))
    runs = [read_run(f) for f in find_runs(run_dirs)]
    summary = summarize(runs)
    notes, pngs = [], {}
    if curves:
        folder = out.parent / f"{out.stem}_curves"
        for r in runs:
            if not r["history"]:
                continue
            name = _safe(r["folder"])
            png = plot_curves(r["folder"], r["history"], folder / f"{name}.png")
            if png is None:
                notes.append(NO_PLOT)
                break
            pngs[r["folder"]] = os.path.relpath(png, out.parent)
    summary["runs"] = [{k: v for k, v in r.items() if k != "config"} for r in runs]
    files = {"json": atomic_write_json(out.with_suffix(".json"), summary),
             "markdown": atomic_write_text(out, report_markdown(summary, runs, pngs))}
    if pngs:
        files["curves"] = [out.parent / p for p in pngs.values()]
    return ReportResult(summary, files, notes)


def _safe(folder: str) -> str:
    parts = [p for p in Path(folder).parts if p not in ("/", ".", "..")]
    return "_".join(parts[-4:]).replace(" ", "_") or "run"
