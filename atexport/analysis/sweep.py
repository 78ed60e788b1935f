"""Rank sweeps: a grid of training runs, its table, its plot and its elbow.

A sweep trains one run per cell ``(adapter family, rank, every, seed)`` with the ordinary trainer
(:func:`atexport.training.train`), each into its own folder::

    OUTPUT/<family>_r<rank>_e<every>/seed_<s>/   run.pt, last.pt, metrics.jsonl, config.yaml

It is resumable cell by cell: a finished cell (its ``metrics.jsonl`` ends with the test score) is
skipped, an interrupted one (a ``last.pt`` without test score, or a damaged ``metrics.jsonl``: the resumed
run writes it again) resumes from its last epoch, and a cell recorded with other settings (its
``config.yaml`` or its ``run.pt``: a checkpoint copied from another cell) is refused rather than mixed in.
Cell files are read through their one reader each (:mod:`atexport.artifact.runfiles`, ``load_checkpoint``)
and errors name the file, never a flag the sweep was not given. Before the first cell trains, every
cell's adapter is sized against the machine's memory (a rank of 10^8 is refused with the number). Under ``torchrun`` every process takes
the cells ``i % WORLD_SIZE == RANK`` and trains them alone on its own GPU (``cuda:LOCAL_RANK``); rank 0
waits for the others and writes the summary. Alone, cells run one after another.

``sweep.json`` holds every cell and seed; ``sweep.md`` the table (mean +- std test top-1, trainable
parameters, % of full fine-tuning); ``sweep.png`` accuracy vs rank with the elbow: the smallest rank
whose mean is within ``tolerance`` points of the best mean of its series.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from atexport.errors import BadInputError, IncompatibleCheckpointError

DEFAULT_FAMILY = "adaptertune"
SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"


@dataclass
class SweepResult:
    """What a sweep produced.

    Attributes:
        output: the sweep folder.
        summary: the content of ``sweep.json`` (cells, series with their elbows, missing cells).
        files: written files by kind (``json``, ``markdown``, ``plot`` when matplotlib is installed).
        trained: cells trained (or resumed) by this process; ``skipped``: cells found finished.
        notes: lines for the user (e.g. how to get the plot).
    """

    output: Path
    summary: dict
    files: dict = field(default_factory=dict)
    trained: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def parse_int_list(value, flag: str) -> list[int]:
    """``"2,4,8"`` (or a list) -> ``[2, 4, 8]``: positive, distinct, in the given order."""
    items = str(value).split(",") if isinstance(value, (str, int)) else list(value)
    try:
        out = [int(str(s).strip()) for s in items if str(s).strip() != ""]
    except ValueError:
        raise BadInputError(f"{flag} {value!r}: expected comma-separated positive integers, e.g. 2,4,8.") from None
    if not out or any(v < 1 for v in out):
        raise BadInputError(f"{flag} {value!r}: expected comma-separated positive integers, e.g. 2,4,8.")
    if len(set(out)) != len(out):
        raise BadInputError(f"{flag} {value!r}: each value once, please.")
    return out


def cell_name(family: str, rank: int, every: int) -> str:
    return f"{family}_r{int(rank)}_e{int(every)}"


def cell_state(folder: Path) -> str:
    """``finished`` (test score written), ``interrupted`` (a last.pt to resume) or ``new``.

    A cell whose ``metrics.jsonl`` is missing, empty or damaged is not finished: with its ``last.pt`` it is
    resumed (the trainer writes ``metrics.jsonl`` again from ``last.pt``), without one it is trained anew.
    """
    from atexport.artifact.runfiles import METRICS, metrics_finished

    if (folder / "run.pt").is_file() and (folder / METRICS).is_file() and metrics_finished(folder / METRICS):
        return "finished"
    return "interrupted" if (folder / "last.pt").is_file() else "new"


def elbow(points: list[tuple[int, float]], tolerance: float = 0.5) -> dict | None:
    """The smallest rank whose mean is within ``tolerance`` points of the best mean.

    Args:
        points: ``(rank, mean test top-1 in %)`` pairs.
        tolerance: points of accuracy (0.5: half a point).

    Returns:
        ``{"rank", "mean", "best_rank", "best_mean", "tolerance"}``, or ``None`` without points.
    """
    pts = sorted((int(r), float(m)) for r, m in points if m is not None)
    if not pts:
        return None
    best_rank, best = max(pts, key=lambda p: (p[1], -p[0]))
    rank, mean = next(p for p in pts if p[1] >= best - tolerance)
    return {"rank": rank, "mean": mean, "best_rank": best_rank, "best_mean": best, "tolerance": float(tolerance)}


# ------------------------------------------------------------------------------------------------


def run_sweep(
    base,
    *,
    ranks,
    everies=(1,),
    families=None,
    seeds=(0,),
    output: str | os.PathLike = "runs/sweep",
    tolerance: float = 0.5,
    log: Callable[[str], None] | None = None,
    train_log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Train every cell of the grid that is not finished, then summarise the sweep.

    Args:
        base: the :class:`~atexport.training.TrainConfig` (or a dict of its keys) every cell starts
            from; rank, every, seed and output are set per cell. Its ``progress`` turns the bars on.
        ranks: adapter ranks, e.g. ``[2, 4, 8, 16, 32, 64]``.
        everies: adapter placements (``every`` values).
        families: adapter families (``adaptertune``, ``adaring``, ``adapterx``, ``lora``), passed to the
            trainer as ``adapter: {kind: FAMILY}``; default: the base config's own family.
        seeds: training seeds of each cell.
        output: the sweep folder.
        tolerance: points of accuracy that define the elbow.
        log: receives progress lines (default: stderr).
        train_log: receives the trainer's lines (default: dropped; the sweep logs one line per cell).

    Returns:
        A :class:`SweepResult`. Under torchrun only rank 0's holds the full summary.
    """
    from atexport.training import TrainConfig

    cfg = base if isinstance(base, TrainConfig) else TrainConfig.from_dict(dict(base))
    if cfg.regime != "adapter":
        raise BadInputError(f"a rank sweep trains adapters; the config's regime is {cfg.regime!r} (use --regime adapter).")
    ranks = parse_int_list(ranks, "--ranks")
    everies = parse_int_list(everies, "--every")
    seeds = _seeds(seeds)
    families = _families(families, cfg)
    if not tolerance >= 0:
        raise BadInputError(f"--tolerance must be >= 0 points, got {tolerance}.")
    out = Path(os.path.expanduser(str(output)))
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out}: exists and is not a folder.")
    log = log or _stderr
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in
                               (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
    cells = [(f, r, e, s) for f in families for e in everies for r in ranks for s in seeds]
    mine = [c for i, c in enumerate(cells) if i % world == rank]
    # every cell's config is checked before the first one trains (a bad family or key fails at once)
    configs = {c: _cell_config(cfg, *c, out / cell_name(*c[:3]) / f"seed_{c[3]}", world, local_rank) for c in cells}
    _check_memory(configs.values())
    who = f"[rank {rank}/{world}] " if world > 1 else ""
    group = _join_group(world) if world > 1 else None
    result = SweepResult(out, {})
    try:
        _make_folder(out)
        _train_cells({c: configs[c] for c in mine}, out, result, world, who, cfg.progress, log, train_log)
        if group is not None:
            group.barrier()
        if rank == 0:
            result.summary = summarize_sweep(out, cfg, families, ranks, everies, seeds, tolerance)
            result.summary["processes"] = world
            result.files, result.notes = write_sweep(out, result.summary)
    finally:
        if group is not None:
            group.destroy_process_group()
    return result


def _make_folder(out: Path) -> None:
    """Create the sweep folder, or refuse one that cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"-o {out}: cannot create the sweep folder ({e.strerror or e}); choose another -o."
                            ) from None
    if not os.access(out, os.W_OK):
        raise BadInputError(f"-o {out}: the folder is not writable; choose another -o.")


def _train_cells(configs: dict, out: Path, result: SweepResult, world: int, who: str, progress: bool,
                 log: Callable[[str], None], train_log: Callable[[str], None] | None) -> None:
    """Train this process's cells (``{(family, rank, every, seed): config}``) in order: a finished cell is
    skipped, an interrupted one resumed, a new one trained; ``result`` lists which."""
    from atexport.training import train
    from atexport.utils.progress import Progress

    with Progress(len(configs), f"{who}sweep", enabled=progress, log=log, unit="cell") as bar:
        for (family, r, e, s), cell_cfg in configs.items():
            folder = out / cell_name(family, r, e) / f"seed_{s}"
            state = cell_state(folder)
            _check_same_settings(cell_cfg, folder, state)
            tag = f"{cell_name(family, r, e)}/seed_{s}"
            if state == "finished":
                result.skipped.append(tag)
                bar.update(1, postfix=f"{tag} already finished")
                continue
            cell_cfg = replace(cell_cfg, resume=state == "interrupted", overwrite=state == "new")
            prefix = f"{who}[{tag}] "
            with _single_process_env(world):
                res = train(cell_cfg, log=(lambda line, p=prefix: train_log(p + line)) if train_log else _drop)
            result.trained.append(tag)
            bar.update(1, postfix=f"{tag}: test top-1 {res.metrics.get('test_top1', float('nan')):.2f}%"
                                  + (" (resumed)" if state == "interrupted" else ""))


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _drop(line: str) -> None:
    return None


def _seeds(seeds) -> list[int]:
    from atexport.training import parse_seeds

    return parse_seeds(seeds)


def _families(families, cfg) -> list[str]:
    items = [str(f).strip() for f in (families or ()) if str(f).strip()]
    if not items:
        own = cfg.adapter.get("kind") if isinstance(getattr(cfg, "adapter", None), dict) else None
        return [own or DEFAULT_FAMILY]
    if len(set(items)) != len(items):
        raise BadInputError(f"--adapter {items}: each family once, please.")
    bad = [f for f in items if not f.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise BadInputError(f"--adapter {bad[0]!r}: a family name is letters, digits, '-' and '_'.")
    return items


def _cell_config(cfg, family, rank, every, seed, folder, world, local_rank):
    """The config of one cell: the base with rank, every, seed, output (and family, device)."""
    from atexport.training import TrainConfig

    d = cfg.to_dict()
    d.update(rank=rank, every=every, seed=seed, seeds=None, output=str(folder), resume=False, overwrite=False)
    section = dict(d.get("adapter") or {})
    if family != DEFAULT_FAMILY or section.get("kind") not in (None, DEFAULT_FAMILY):
        section["kind"] = family  # the adapter-family registry reads ``adapter: {kind: ...}``
    if section or "adapter" in d:
        d["adapter"] = section
    if world > 1 and cfg.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            d["device"] = f"cuda:{local_rank % torch.cuda.device_count()}"
    return TrainConfig.from_dict(d, source=f"sweep cell {folder}")


def _check_memory(configs) -> None:
    """Size every distinct adapter of the grid against this machine's memory before any cell trains."""
    from atexport.adapters.base import check_adapter_memory
    from atexport.models import backbone_dims

    dims: dict = {}
    seen = set()
    for c in configs:
        ad = c.adapter_config()
        if ad is None or repr(ad) in seen:
            continue
        seen.add(repr(ad))
        key = (c.backbone, repr(c.resolved_model_args()))
        if key not in dims:
            dims[key] = backbone_dims(c.backbone, c.resolved_model_args())
        check_adapter_memory(ad, *dims[key], flag="--ranks")


def _check_same_settings(cell_cfg, folder: Path, state: str) -> None:
    """Refuse to skip or resume a cell recorded with other settings (its numbers would not fit): its
    ``config.yaml``, and for a finished cell the config recorded in its ``run.pt``."""
    from atexport.artifact.runfiles import CONFIG, read_run_config

    saved_path = folder / CONFIG
    if state == "new":
        return
    checks = []
    if saved_path.is_file():
        checks.append((saved_path, read_run_config(saved_path)))
    from atexport.checkpoint import load_checkpoint

    if state == "finished":
        checks.append((folder / "run.pt", load_checkpoint(folder / "run.pt", flag=None, layout="trained").config))
    else:  # interrupted: last.pt is read here, so that its damage is named by path (the sweep has no --resume)
        last = load_checkpoint(folder / "last.pt", flag=None, layout="trained")
        if not last.resume:
            raise IncompatibleCheckpointError(f"{folder / 'last.pt'} holds no resume state; delete {folder} to "
                                              "retrain the cell.")
        checks.append((folder / "last.pt", last.config))
    for path, saved in checks:
        diffs = cell_cfg.differences(saved)
        if diffs:
            raise IncompatibleCheckpointError(
                f"{path} was written with other settings than this cell's ({'; '.join(diffs[:4])}): it belongs to "
                f"another run. Sweep into another -o, or delete {folder} to retrain the cell."
            )


@contextlib.contextmanager
def _single_process_env(world: int):
    """Hide torchrun's WORLD_SIZE from the trainer, so it trains this cell alone (no DDP)."""
    if world <= 1:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _join_group(world: int):
    """torchrun's process group (gloo: it only waits for the other processes), long timeout."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return dist


# ------------------------------------------------------------------------------------------------
# Summary


def _read_cell(folder: Path, cell_cfg=None) -> dict | None:
    """Test top-1 and parameter counts of a finished cell (from run.pt's metrics), checked to be this cell's."""
    if cell_state(folder) != "finished":
        return None
    from atexport.checkpoint import load_checkpoint

    run = folder / "run.pt"
    ck = load_checkpoint(run, flag=None, layout="trained")
    if cell_cfg is not None:
        diffs = cell_cfg.differences(ck.config)
        if diffs:
            raise IncompatibleCheckpointError(
                f"{run} belongs to another run ({'; '.join(diffs[:4])}); delete {folder} to retrain the cell.")
    m = ck.metrics
    p = m.get("params") if m.get("params") is not None else {}
    bad = [k for k in ("test_top1", "val_top1") if m.get(k) is not None and not _is_number(m[k])]
    if not isinstance(p, dict):
        bad.append("params")
    else:
        bad += [f"params.{k}" for k in ("trainable", "share", "full_finetune") if p.get(k) is not None
                and not _is_number(p[k])]
    if m.get("test_top1") is None:
        bad.append("test_top1")
    if bad:
        raise BadInputError(f"{run}: damaged metrics ({', '.join(bad)}); delete {folder} to retrain the cell.")
    return {"test_top1": m.get("test_top1"), "val_top1": m.get("val_top1"), "epoch": m.get("epoch"),
            "trainable": p.get("trainable"), "share": p.get("share"), "full_finetune": p.get("full_finetune")}


def _is_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize_sweep(out: Path, cfg, families, ranks, everies, seeds, tolerance: float) -> dict:
    """Read every cell of the grid from disk: per-seed scores, mean and std, elbows, missing cells."""
    import numpy as np

    series, missing = [], []
    for family in families:
        for e in everies:
            cells = []
            for r in sorted(ranks):
                runs = {}
                for s in seeds:
                    got = _read_cell(out / cell_name(family, r, e) / f"seed_{s}",
                                     _cell_config(cfg, family, r, e, s, out / cell_name(family, r, e) / f"seed_{s}",
                                                  1, 0))
                    if got is None:
                        missing.append(f"{cell_name(family, r, e)}/seed_{s}")
                    else:
                        runs[str(s)] = got
                vals = [v["test_top1"] for v in runs.values() if v.get("test_top1") is not None]
                first = next(iter(runs.values()), {})
                cells.append({
                    "rank": r, "every": e, "family": family, "folder": cell_name(family, r, e),
                    "seeds": runs, "n": len(vals),
                    "mean": float(np.mean(vals)) if vals else None,
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None),
                    "trainable": first.get("trainable"), "share": first.get("share"),
                })
            label = family + (f" every {e}" if len(everies) > 1 or e != 1 else "")
            series.append({"family": family, "every": e, "label": label, "cells": cells,
                           "elbow": elbow([(c["rank"], c["mean"]) for c in cells], tolerance)})
    return {
        "format": "atexport.sweep", "version": 1, "dataset": cfg.dataset, "backbone": cfg.backbone,
        "grid": {"families": list(families), "ranks": list(ranks), "every": list(everies), "seeds": list(seeds)},
        "tolerance": float(tolerance), "std_ddof": 1, "series": series, "missing": missing,
        "complete": not missing, "config": cfg.to_dict(record=True),
    }


def sweep_markdown(summary: dict) -> str:
    """The sweep's table (one row per cell) and one elbow line per series."""
    tol = summary["tolerance"]
    lines = [f"# Rank sweep: {summary['dataset']} ({summary['backbone']})", "",
             f"Seeds {', '.join(map(str, summary['grid']['seeds']))}; test top-1 as mean +- std over seeds "
             f"(sample std); elbow = the smallest rank within {tol:g} pt of the best mean of its series.", "",
             "| family | every | rank | test top-1 (%) | seeds | trainable params | % of full fine-tuning |",
             "|---|---|---|---|---|---|---|"]
    for s in summary["series"]:
        el = s.get("elbow") or {}
        for c in s["cells"]:
            acc = f"{c['mean']:.2f} +- {c['std']:.2f}" if c["mean"] is not None else "-"
            if el.get("rank") == c["rank"]:
                acc = f"**{acc}** (elbow)"
            params = f"{c['trainable']:,}" if c.get("trainable") is not None else "-"
            share = f"{100 * c['share']:.3f}" if c.get("share") is not None else "-"
            lines.append(f"| {c['family']} | {c['every']} | {c['rank']} | {acc} | {c['n']} | {params} | {share} |")
    lines.append("")
    for s in summary["series"]:
        el = s.get("elbow")
        if el:
            lines.append(f"- {s['label']}: elbow at rank {el['rank']} ({el['mean']:.2f}%), the smallest rank within "
                         f"{tol:g} pt of the best ({el['best_mean']:.2f}% at rank {el['best_rank']}).")
    if summary["missing"]:
        lines += ["", f"Not finished ({len(summary['missing'])}): " + ", ".join(summary["missing"])
                  + ". Run the same command again to train them."]
    return "\n".join(lines) + "\n"


def write_sweep(out: Path, summary: dict) -> tuple[dict, list[str]]:
    """Write ``sweep.json``, ``sweep.md`` and (with matplotlib) ``sweep.png``; return (files, notes)."""
    from atexport.analysis.plots import NO_PLOT, plot_sweep
    from atexport.utils.io import atomic_write_json, atomic_write_text

    files = {"json": atomic_write_json(out / SWEEP_JSON, summary),
             "markdown": atomic_write_text(out / SWEEP_MD, sweep_markdown(summary))}
    png = plot_sweep(summary, out / SWEEP_PNG)
    notes = []
    if png is None:
        notes.append(NO_PLOT)
    else:
        files["plot"] = png
    return files, notes
