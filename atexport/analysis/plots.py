"""Figures of the analysis commands, drawn with matplotlib's Agg backend (no display needed).

matplotlib is optional (``pip install "atexport[plot]"``). :func:`matplotlib_or_none` returns the
pyplot module, or ``None`` with :data:`NO_PLOT` as the one line the commands print instead of a
figure. Every figure is written atomically.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

NO_PLOT = 'plots skipped: matplotlib is not installed; pip install "atexport[plot]" to get them.'


def matplotlib_or_none():
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    from atexport.utils.io import atomic_write_bytes

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_sweep(summary: dict, path: str | os.PathLike) -> Path | None:
    """Accuracy vs rank (log2 x axis, error bars = std over seeds), trainable parameters on a second
    axis, the elbow of each series marked and named. Returns the PNG's path, or ``None`` without matplotlib.
    """
    plt = matplotlib_or_none()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax2 = ax.twinx()
    tol = summary.get("tolerance", 0.5)
    all_ranks = set()
    for k, s in enumerate(summary["series"]):
        pts = [c for c in s["cells"] if c.get("mean") is not None]
        if not pts:
            continue
        color = f"C{k % 10}"
        ranks = [c["rank"] for c in pts]
        all_ranks.update(ranks)
        ax.errorbar(ranks, [c["mean"] for c in pts], yerr=[c["std"] or 0.0 for c in pts], marker="o",
                    capsize=3, color=color, label=f"{s['label']} test top-1")
        params = [c.get("trainable") for c in pts]
        if all(p is not None for p in params):
            ax2.plot(ranks, params, linestyle="--", marker=".", color=color, alpha=0.5,
                     label=f"{s['label']} trainable params")
        e = s.get("elbow")
        if e:
            ax.scatter([e["rank"]], [e["mean"]], s=180, facecolors="none", edgecolors="red", linewidths=2, zorder=5)
            ax.annotate(f"elbow: r={e['rank']}\n({e['mean']:.1f}%, within {tol:g} pt of best)",
                        (e["rank"], e["mean"]), textcoords="offset points", xytext=(10, -30), fontsize=8,
                        color="red", arrowprops={"arrowstyle": "->", "color": "red"})
    ax.set_xscale("log", base=2)
    if all_ranks:
        ticks = sorted(all_ranks)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("adapter rank r (log2)")
    ax.set_ylabel("test top-1 (%), mean +- std over seeds")
    ax2.set_ylabel("trainable parameters")
    ax2.set_yscale("log")
    ax.grid(True, alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.set_title(f"Rank sweep: {summary.get('dataset', '')}")
    return _save(fig, path)


def plot_spectrum(result: dict, path: str | os.PathLike) -> Path | None:
    """Per block: the normalised singular values of the adapter's update (left) and its effective rank
    at 90/95/99% energy (right)."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    adapters = result["adapters"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, a in enumerate(adapters):
        s = [v / a["singular_values"][0] if a["singular_values"][0] > 0 else 0.0 for v in a["singular_values"]]
        a1.plot(range(1, len(s) + 1), s, marker=".", color=plt.cm.viridis(k / max(1, len(adapters) - 1)),
                label=a["name"] if len(adapters) <= 12 else None)
    if any(a["singular_values"] and a["singular_values"][0] > 0 for a in adapters):
        a1.set_yscale("log")
    a1.set_xlabel("index of singular value")
    a1.set_ylabel("sigma_i / sigma_1")
    a1.set_title("Singular values of up.weight @ down.weight")
    if len(adapters) <= 12:
        a1.legend(fontsize=6, ncol=2)
    names = [a["name"] for a in adapters]
    x = list(range(len(adapters)))
    width = 0.27
    for j, e in enumerate(("90", "95", "99")):
        a2.bar([i + (j - 1) * width for i in x], [a["effective_rank"][e] for a in adapters], width, label=f"{e}% energy")
    a2.axhline(result["rank"], color="black", linestyle="--", linewidth=1, label=f"rank r = {result['rank']}")
    a2.set_xticks(x)
    a2.set_xticklabels(names, rotation=60, fontsize=7)
    a2.set_ylabel("effective rank")
    a2.set_title("Effective rank per adapter")
    a2.legend(fontsize=7)
    return _save(fig, path)


def _num(v) -> float:
    return math.nan if v is None else float(v)


def plot_curves(name: str, history: list[dict], path: str | os.PathLike) -> Path | None:
    """Loss and top-1 per epoch (train, and validation where recorded) of one run."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, [_num(h.get("train_loss")) for h in history], marker=".", label="train")
    a2.plot(ep, [_num(h.get("train_top1")) for h in history], marker=".", label="train")
    if any(h.get("val_loss") is not None for h in history):
        a1.plot(ep, [_num(h.get("val_loss")) for h in history], marker=".", label="val")
        a2.plot(ep, [_num(h.get("val_top1")) for h in history], marker=".", label="val")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a2.set_xlabel("epoch")
    a2.set_ylabel("top-1 (%)")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(name, fontsize=10)
    return _save(fig, path)
