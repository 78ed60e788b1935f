"""Reports of finished runs: the paper-style table, training curves, per-backend accuracy.

:func:`build_report` takes run folders (a single run, a ``--seeds`` folder, a sweep: every folder
below that holds ``metrics.jsonl`` and ``config.yaml`` is a run), groups the runs by method (regime,
or adapter family with its rank and placement) and data set, and writes:

into the folder ``-o`` (default ``report/``; never a run's own folder or file: outputs never overwrite
inputs):

- ``report.md``: one row per method and backbone, one column per data set, test top-1 as mean +- std
  over seeds (sample std) with the trainable parameters; then, for runs with ``atexport verify``
  reports (``verify.json`` in the run folder or below it), the accuracy of every backend;
- ``report.json``: the same numbers, and every run's final metrics;
- ``curves/*.png``: loss and top-1 per epoch of each run (with matplotlib).

Runs are grouped by backbone too: the backbone's name, its architecture overrides and the fingerprint
of its weights (from ``run.pt``), so runs on different backbones never share a mean. Every run file is
read through its one reader (:mod:`atexport.artifact.runfiles`, ``load_checkpoint``), all of them
before anything is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from atexport.errors import BadInputError

from atexport.artifact.runfiles import CONFIG, METRICS, VERIFY, read_metrics, read_run_config, read_verify

REPORT_MD, REPORT_JSON, CURVES = "report.md", "report.json", "curves"


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
    cfg = read_run_config(folder / CONFIG)
    metrics = read_metrics(folder / METRICS)
    test = metrics.test
    ck = _checkpoint(folder)
    verify = []
    for v in sorted(folder.rglob(VERIFY)):
        if any((p / METRICS).is_file() for p in v.parents if p != folder and folder in p.parents):
            continue  # belongs to a run nested below this one
        verify.append(read_verify(v))
    return {"folder": str(folder), "method": method_of(cfg, folder), "dataset": str(cfg.get("dataset")),
            "backbone": backbone_of(cfg, ck), "fingerprint": ck["fingerprint"] if ck else None,
            "seed": _int_key(cfg, "seed", folder, None, minimum=0), "config": cfg, "history": metrics.history,
            "test_top1": test.get("test_top1") if test else None, "test_epoch": test.get("epoch") if test else None,
            "finished": test is not None, "params": ck["params"] if ck else None, "verify": verify}


def _int_key(cfg: dict, key: str, folder: Path, default=None, minimum: int = 1):
    v = cfg.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise BadInputError(f"{folder / CONFIG}: {key} is {str(v)[:40]!r}, not a whole number >= {minimum}; retrain "
                            "the run, or restore the file.")
    return v


def method_of(cfg: dict, folder: Path = Path(".")) -> str:
    """``adaptertune r16``, ``adaptertune r8 every 2``, ``head only``, ``full fine-tuning``."""
    regime = cfg.get("regime", "adapter")
    if regime == "head":
        return "head only"
    if regime == "full":
        return "full fine-tuning"
    adapter = cfg.get("adapter")
    if adapter is not None and not isinstance(adapter, dict):
        raise BadInputError(f"{folder / CONFIG}: adapter is {adapter!r}, not a mapping; retrain the run, or "
                            "restore the file.")
    kind = str(adapter.get("kind")) if isinstance(adapter, dict) and adapter.get("kind") else "adaptertune"
    every = _int_key(cfg, "every", folder, 1)
    return f"{kind} r{_int_key(cfg, 'rank', folder)}" + (f" every {every}" if every != 1 else "")


def backbone_of(cfg: dict, ck: dict | None) -> str:
    """The backbone a run trained on: the name (``run.pt``'s, pinned tag included), its architecture
    overrides, and whether it was random; the weights' fingerprint separates the rest (see summarize)."""
    name = str((ck or {}).get("backbone") or cfg.get("backbone"))
    args = cfg.get("model_args")
    if ck and ck.get("model_args") is not None:
        args = ck["model_args"]
    if isinstance(args, dict) and args:
        name += " (" + ", ".join(f"{k}={v}" for k, v in sorted(args.items(), key=lambda kv: str(kv[0]))) + ")"
    if ck and ck.get("source") == "random":
        name += " random init"
    return name


def _checkpoint(folder: Path) -> dict | None:
    """What the report takes from ``run.pt``: parameter counts and the backbone's identity."""
    run = folder / "run.pt"
    if not run.is_file():
        return None
    from atexport.checkpoint import load_checkpoint

    ck = load_checkpoint(run, flag=None, layout="trained")
    params = (ck.metrics or {}).get("params")
    if params is not None and not (isinstance(params, dict)
                                   and all(isinstance(params.get(k), (int, float, type(None))) and
                                           not isinstance(params.get(k), bool) for k in ("trainable", "share"))):
        raise BadInputError(f"{run}: damaged atexport checkpoint (metrics.params must hold the parameter counts); "
                            "retrain the run, or restore the file.")
    return {"params": params, "fingerprint": ck.fingerprint, "backbone": ck.model.backbone,
            "model_args": ck.model.model_args, "source": (ck.model.source or {}).get("kind")}


def _stats(values: list[float]) -> dict:
    import numpy as np

    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": [float(v) for v in values]}


def summarize(runs: list[dict]) -> dict:
    """Group runs by (backbone, method) x data set; mean and std of test top-1 over their seeds.

    The backbone is its name with overrides and the fingerprint of its weights: two groups of one name
    whose weights differ are told apart by the fingerprint's first digits.
    """
    groups: dict = {}
    for r in runs:
        if r["test_top1"] is None:
            continue
        groups.setdefault((r["backbone"], r.get("fingerprint"), r["method"]), {}).setdefault(r["dataset"], []).append(r)
    prints: dict = {}
    for backbone, fp, method in groups:
        prints.setdefault((backbone, method), set()).add(fp)
    datasets = sorted({r["dataset"] for r in runs if r["test_top1"] is not None})
    rows = []
    for (backbone, fp, method), by_ds in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        cells = {}
        for ds, rs in by_ds.items():
            p = next((x["params"] for x in rs if x["params"]), None) or {}
            seeds = [x["seed"] for x in rs]
            cells[ds] = {**_stats([x["test_top1"] for x in rs]), "seeds": seeds,
                         "repeated_seeds": sorted({str(s) for s in seeds if seeds.count(s) > 1}),
                         "trainable": p.get("trainable"), "share": p.get("share"),
                         "runs": [x["folder"] for x in rs]}
        label = backbone + (f" [weights {str(fp)[:8]}]" if len(prints[(backbone, method)]) > 1 else "")
        rows.append({"backbone": label, "fingerprint": fp, "method": method, "cells": cells})
    return {"format": "atexport.report", "version": 2, "datasets": datasets, "rows": rows, "std_ddof": 1,
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
            if c.get("trainable") is not None and c.get("share") is not None:
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


def check_output_folder(output, runs: list[Path]) -> Path:
    """The report folder ``-o``: a folder (made if missing), never a run folder nor a file of one."""
    out = Path(os.path.expanduser(str(output)))
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out}: exists and is not a folder; a report writes a folder ({REPORT_MD}, "
                            f"{REPORT_JSON}, {CURVES}/). Give a new folder, e.g. -o report.")
    if out.suffix.lower() in (".md", ".json", ".jsonl", ".pt", ".yaml"):
        raise BadInputError(f"-o {out}: a report writes a folder ({REPORT_MD}, {REPORT_JSON}, {CURVES}/), not a "
                            f"{out.suffix} file; give a folder, e.g. -o {out.with_suffix('')}.")
    resolved = out.resolve()
    for r in runs:
        if resolved == r.resolve():
            raise BadInputError(f"-o {out}: that is the run folder {r}; a report never writes into its inputs. "
                                "Give another folder, e.g. -o report.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"-o {out}: cannot create the folder ({e.strerror}); choose another -o.") from None
    if not os.access(out, os.W_OK):
        raise BadInputError(f"-o {out}: the folder is not writable; choose another -o.")
    return out


def build_report(run_dirs, output: str | os.PathLike = "report", curves: bool = True) -> ReportResult:
    """The report of finished runs; see the module docstring for what is written.

    Every run file is read and checked before anything is written; nothing is written into a run.

    Args:
        run_dirs: run folders (single runs, ``--seeds`` folders, sweeps).
        output: the report folder: ``report.md``, ``report.json`` and ``curves/`` go into it.
        curves: draw a loss/top-1 figure per run (needs matplotlib).

    Returns:
        A :class:`ReportResult`.
    """
    from atexport.analysis.plots import NO_PLOT, plot_curves
    from atexport.utils.io import atomic_write_json, atomic_write_text

    if not run_dirs:
        raise BadInputError("give at least one run folder, e.g. atexport report runs/pets runs/cifar10.")
    folders = find_runs(run_dirs)
    runs = [read_run(f) for f in folders]
    summary = summarize(runs)
    summary["runs"] = [{k: v for k, v in r.items() if k != "config"} for r in runs]
    out = check_output_folder(output, folders)
    notes, pngs = [], {}
    if curves:
        for r in runs:
            if not r["history"]:
                continue
            png = plot_curves(r["folder"], r["history"], out / CURVES / f"{_safe(r['folder'])}.png")
            if png is None:
                notes.append(NO_PLOT)
                break
            pngs[r["folder"]] = os.path.relpath(png, out)
    markdown = report_markdown(summary, runs, pngs)
    files = {"json": atomic_write_json(out / REPORT_JSON, summary),
             "markdown": atomic_write_text(out / REPORT_MD, markdown)}
    if pngs:
        files["curves"] = [out / p for p in pngs.values()]
    return ReportResult(summary, files, notes)


def _safe(folder: str) -> str:
    parts = [p for p in Path(folder).parts if p not in ("/", ".", "..")]
    return "_".join(parts[-4:]).replace(" ", "_") or "run"
