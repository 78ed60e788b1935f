"""Adapter spectra: how many directions each trained adapter actually uses, and the rank to try next.

An AdapterTune adapter adds ``alpha * up(GELU(down(h)))`` to the block's output. Its linearised update
``W = alpha * up.weight @ down.weight`` (D x D, rank at most r) says how many directions of the
residual stream it writes to. Per adapter this module reports the singular values of ``W``, the
effective rank at 90/95/99% energy (the fewest singular values whose squares hold that share of the
total), and across adapters a recommended rank for the next run, with its reasoning. The GELU and the
biases are ignored: the numbers describe the linear part of the update.

For other adapter families (AdaRing, Adapter-X), the family's ``export_state(config, state_dict)`` in
:mod:`atexport.adapters` materialises the per-layer matrices (or experts) in the AdapterTune layout,
and the same analysis runs on them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from atexport.errors import BadInputError, IncompatibleCheckpointError

ENERGIES = (0.90, 0.95, 0.99)
DOWN, UP = "down.weight", "up.weight"  # AdapterTune/Adapter-X "...down.weight", LoRA "...q_down.weight"


@dataclass
class SpectrumResult:
    """What :func:`analyze_checkpoint` measured.

    Attributes:
        checkpoint: the analysed ``run.pt``.
        summary: the content of ``spectrum.json`` (per adapter: singular values and effective ranks;
            the recommendation).
        recommended_rank: the rank suggested for the next run.
        reasoning: the lines that explain it.
        files: written files by kind (``json``, ``markdown``, ``plot`` with matplotlib).
        notes: lines for the user (e.g. how to get the plot).
    """

    checkpoint: Path
    summary: dict
    recommended_rank: int | None
    reasoning: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def table(self) -> str:
        """One line per adapter: name, top singular values, effective ranks."""
        rows = [f"{'adapter':<28} {'sigma_1':>9} {'r90':>4} {'r95':>4} {'r99':>4}"]
        for a in self.summary["adapters"]:
            e = a["effective_rank"]
            s1 = a["singular_values"][0] if a["singular_values"] else 0.0
            rows.append(f"{a['name']:<28} {s1:>9.4g} {e['90']:>4} {e['95']:>4} {e['99']:>4}")
        return "\n".join(rows)


def effective_rank(singular_values, energy: float) -> int:
    """The fewest singular values whose squares hold ``energy`` (0..1) of the total; 0 for a zero matrix."""
    import numpy as np

    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    total = float(s2.sum())
    if total <= 0:
        return 0
    cum = np.cumsum(s2) / total
    return int(np.searchsorted(cum, energy - 1e-12) + 1)


def adapter_pairs(state_dict: dict, experts: int = 0, rank: int = 0) -> list[tuple[str, object, object]]:
    """``(name, down, up)`` of every low-rank pair in a state dict, in block order.

    Pairs are ``X.down.weight``/``X.up.weight`` (AdapterTune) or ``X_down.weight``/``X_up.weight`` (LoRA's
    q/k/v branches). With ``experts`` > 1, a pair whose down has ``experts * rank`` rows (Adapter-X's
    shared experts, stacked) is split into one pair per expert.
    """
    def order(name: str):
        return [int(p) if p.isdigit() else p for p in name.split(".")]

    out = []
    for k in sorted((k for k in state_dict if k.endswith(DOWN) and k[-len(DOWN) - 1:-len(DOWN)] in "._"), key=order):
        prefix = k[: -len(DOWN)]
        if prefix + UP not in state_dict:
            continue
        name, d, u = prefix.rstrip("._"), state_dict[k], state_dict[prefix + UP]
        if experts > 1 and rank and d.shape[0] == experts * rank and u.shape[1] == experts * rank:
            out += [(f"{name}[{e}]", d[e * rank:(e + 1) * rank], u[:, e * rank:(e + 1) * rank])
                    for e in range(experts)]
        else:
            out.append((name, d, u))
    return out


def spectrum_of(down, up, alpha: float = 1.0) -> dict:
    """Singular values (largest first, the top ``r``) and effective ranks of ``alpha * up @ down``."""
    import numpy as np

    d = np.asarray(_numpy(down), dtype=np.float64)
    u = np.asarray(_numpy(up), dtype=np.float64)
    if d.ndim != 2 or u.ndim != 2 or u.shape[1] != d.shape[0]:
        raise IncompatibleCheckpointError(f"adapter tensors of shapes {u.shape} @ {d.shape} do not multiply.")
    if not (np.isfinite(d).all() and np.isfinite(u).all() and math.isfinite(alpha)):
        raise BadInputError("adapter tensors hold NaN or infinite values (a diverged run); they have no spectrum.")
    r = d.shape[0]
    # W = U D has rank <= r: its singular values are those of the small r x r matrix R_u R_d^T.
    _, ru = np.linalg.qr(u)
    _, rd = np.linalg.qr(d.T)
    s = np.linalg.svd(alpha * ru @ rd.T, compute_uv=False)[:r]
    s = np.sort(np.abs(s))[::-1]
    return {"singular_values": [float(v) for v in s],
            "effective_rank": {f"{round(100 * e)}": effective_rank(s, e) for e in ENERGIES},
            "frobenius": float(math.sqrt(float((s ** 2).sum())))}


def _numpy(t):
    return t.detach().cpu().float().numpy() if hasattr(t, "detach") else t


def recommend(adapters: list[dict], rank: int) -> tuple[int | None, list[str]]:
    """A rank for the next run from the adapters' effective ranks, and why."""
    live = [a for a in adapters if a["singular_values"] and a["singular_values"][0] > 0]
    if not live:
        return None, ["every adapter's update is zero (untrained, or zero-initialised and never stepped): "
                      "no evidence for another rank; train first."]
    worst95 = max(live, key=lambda a: a["effective_rank"]["95"])
    k95 = worst95["effective_rank"]["95"]
    k99 = max(a["effective_rank"]["99"] for a in live)
    why = [f"the largest effective rank at 95% energy is {k95} ({worst95['name']}); at 99%: {k99}; rank r = {rank}."]
    if k99 >= rank:
        rec = 2 * rank
        why.append(f"some adapter needs all {rank} directions for 99% of its update's energy, so the rank may be "
                   f"limiting it: try r = {rec} and compare (atexport sweep finds the elbow).")
    else:
        rec = max(1, 1 << (k95 - 1).bit_length())  # next power of two >= k95
        if rec < rank:
            why.append(f"every adapter keeps 95% of its update's energy in {k95} directions or fewer: r = {rec} "
                       f"(the next power of two) should do with {rec / rank:.0%} of the adapter parameters.")
        else:
            rec = rank
            why.append(f"the 95% effective rank rounds up to r = {rank}: keep it.")
    why.append("(the linearised update up @ down ignores the GELU between them and the biases.)")
    return rec, why


def analyze_checkpoint(ckpt: str | os.PathLike, output: str | os.PathLike | None = None) -> SpectrumResult:
    """Spectrum analysis of a checkpoint's adapters; writes ``spectrum.json``, ``.md`` and ``.png``.

    Args:
        ckpt: an adapter ``run.pt``.
        output: folder for the reports (default: ``analysis/`` beside the checkpoint).

    Returns:
        A :class:`SpectrumResult` with the recommended rank and its reasoning.
    """
    from atexport.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    if ck.regime != "adapter" or ck.adapter is None:
        raise IncompatibleCheckpointError(
            f"--ckpt {ck.path}: a '{ck.regime}' checkpoint holds no adapters to analyse (train with --regime adapter)."
        )
    origin = getattr(ck.adapter, "materialised_from", None) or {}  # e.g. AdaRing saved as its matrices
    kind = origin.get("kind") or getattr(ck.adapter, "kind", "adaptertune")
    cfg, state = _export_layout(ck)
    pairs = adapter_pairs(state, int(getattr(cfg, "experts", 0) or 0), int(getattr(cfg, "rank", 0) or 0))
    if not pairs:
        raise IncompatibleCheckpointError(
            f"--ckpt {ck.path}: no low-rank down/up weights found in its {kind} adapters; nothing to analyse."
        )
    alpha = _scale(cfg)
    import numpy as np

    bad = [name for name, d, u in pairs if not (np.isfinite(_numpy(d)).all() and np.isfinite(_numpy(u)).all())]
    if bad or not np.isfinite(alpha):
        raise BadInputError(
            f"--ckpt {ck.path}: adapter {bad[0] if bad else 'scale'} holds NaN or infinite values (the run diverged); "
            "there is no spectrum to analyse. Retrain with a lower --lr, or analyse a checkpoint of a finite epoch."
        )
    adapters = [{"name": name, **spectrum_of(d, u, alpha)} for name, d, u in pairs]
    rank = int(getattr(cfg, "rank", 0) or max(len(a["singular_values"]) for a in adapters))
    rec, why = recommend(adapters, rank)
    summary = {"format": "atexport.spectrum", "version": 1, "checkpoint": str(ck.path), "kind": kind,
               "rank": rank, "alpha": alpha, "energies": [round(100 * e) for e in ENERGIES],
               "adapters": adapters, "recommended_rank": rec, "reasoning": why}
    out = Path(output) if output is not None else Path(ck.path).parent / "analysis"
    result = SpectrumResult(Path(ck.path), summary, rec, why)
    result.files, result.notes = _write(out, summary, result.table())
    return result


def _export_layout(ck):
    """``(config, tensors)`` with materialised low-rank pairs: AdaRing's per-layer matrices come from
    its ring cores (the family's export layout); the other families' are their own tensors."""
    try:
        from atexport.adapters import export_view
    except ImportError:  # an atexport without adapter families: AdapterTune only
        return ck.adapter, ck.state_dict
    cfg, state = export_view(ck.adapter, ck.state_dict)
    return cfg, state


def _scale(cfg) -> float:
    """The factor in front of ``up @ down``: AdapterTune's alpha, LoRA's lora_alpha / rank."""
    for attr in ("scale", "alpha"):
        v = getattr(cfg, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 1.0


def _write(out: Path, summary: dict, table: str) -> tuple[dict, list[str]]:
    from atexport.analysis.plots import NO_PLOT, plot_spectrum
    from atexport.utils.io import atomic_write_json, atomic_write_text, check_writable

    check_writable(out / "spectrum.json")
    md = [f"# Adapter spectrum: `{summary['checkpoint']}`", "",
          f"Family {summary['kind']}, rank r = {summary['rank']}, alpha {summary['alpha']:g}. Singular values of "
          "alpha * up.weight @ down.weight; effective rank = fewest singular values holding 90/95/99% of the "
          "squared sum.", "", "```", table, "```", "",
          f"Recommended rank: **{summary['recommended_rank']}**", ""] + [f"- {w}" for w in summary["reasoning"]]
    files = {"json": atomic_write_json(out / "spectrum.json", summary),
             "markdown": atomic_write_text(out / "spectrum.md", "\n".join(md) + "\n")}
    png = plot_spectrum(summary, out / "spectrum.png")
    if png is None:
        return files, [NO_PLOT]
    files["plot"] = png
    return files, []
