"""Comparing the logits of two runners against per-precision tolerances: the one parity rule of atexport.

Tolerances are data (``export_configs/tolerances.yaml``, read by :mod:`atexport.parity.tolerances`). A result
outside tolerance is a failure
(:class:`~atexport.errors.ParityError` where the caller asks for it), never a warning.

The rule, used by every export, precision conversion, engine build and ``atexport verify``:

* **Magnitude**: the largest absolute and relative logit difference (``max_abs``, ``max_rel``) and
  non-finite logits fail a row outright; these are gross checks that hold on any input.
* **Per-sample cosine**: a sample whose logit cosine is below ``min_cosine`` is an outlier; the row fails
  when the outliers' share is *significantly* above ``max_low_cosine_share`` (a one-sided binomial test at
  ``confidence``, :mod:`atexport.parity.stats`). With a share of 0 (FP32) any outlier fails.
* **Top-1 flips, ties aside**: a sample whose top-1 class differs is a *flip* unless the reference's
  top-1 margin (top-1 minus top-2 logit) is at most the logit error measured on that very sample and that
  error is small (cosine at least ``min_cosine``, largest error at most ``max_tie_error`` of the sample's
  centred logit norm); such a *near-tie* is reported but not counted (the sample has no decision to keep:
  a small error moves it either way). A large error never excuses its own flips. The row fails when the flips'
  share is significantly above ``1 - min_top1_agreement``; its Clopper-Pearson upper bound is reported.

Rows are *judged* (all of the above) or *smoke* (magnitude only). Precision checks judge held-out
in-domain images (the calibration set's held-out share, plus the user's images); generic photos and
random inputs are then smoke checks: out-of-domain inputs whose logits are nearly tied say nothing
about a model's decisions, and judging them gave different verdicts on different CPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from atexport.errors import ParityError
from atexport.parity.stats import significantly_above, upper_bound
from atexport.parity.tolerances import Tolerance, load_tolerances  # noqa: F401 - the parity API names them here too


@dataclass
class ParityResult:
    """Numbers of one comparison (reference vs candidate) and whether they pass.

    ``top1_agreement`` is the plain share of equal top-1 classes; ``flips`` and ``near_ties`` split the
    disagreements by the reference's margin (see the module docstring), ``flip_bound`` is the upper
    confidence bound of the flip share, ``low_cosine`` the number of cosine outliers. ``judged`` is False
    for smoke rows (magnitude checks only).
    """

    name: str
    samples: int
    max_abs: float
    mean_abs: float
    max_rel: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float
    tolerance: Tolerance
    failures: list[str] = field(default_factory=list)
    flips: int = 0
    near_ties: int = 0
    flip_bound: float = 0.0
    low_cosine: int = 0
    judged: bool = True

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    num = (ref * cand).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(ref - cand).sum(axis=1) == 0, 1.0, 0.0))


def top1_flips(ref: np.ndarray, cand: np.ndarray, within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(flips, near_ties)`` over the samples of two (N, C) logit arrays.

    A disagreement is a near-tie when the reference's top-1 margin is at most the sample's own largest
    absolute logit error (an error of that size can move the decision either way) *and* that error is
    one the tolerance accepts (``within``: the sample's cosine is within tolerance), else a flip: a
    broken candidate's large errors never excuse its own flips.
    """
    ref = np.asarray(ref, np.float64)
    cand = np.asarray(cand, np.float64)
    if ref.shape[1] < 2:
        none = np.zeros(len(ref), bool)
        return none, none
    disagree = ref.argmax(1) != cand.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    err = np.abs(ref - cand).max(axis=1)
    tie = margin <= err
    if within is not None:
        tie &= np.asarray(within, bool)
    return disagree & ~tie, disagree & tie


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, name: str = "candidate",
            judged: bool = True) -> ParityResult:
    """Compare two logit arrays of shape (N, C) by the rule in the module docstring.

    Args:
        reference, candidate: the logits.
        tolerance: the limits.
        name: the row's name.
        judged: ``False`` for a smoke row (magnitude checks only: out-of-domain or random inputs).
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ParityError(f"{name}: output shape {cand.shape} differs from the reference's {ref.shape}.")
    diff = np.abs(ref - cand)
    finite = bool(np.isfinite(cand).all())
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    n = int(len(ref))
    cos = _cosines(ref, cand) if n else np.ones(0)
    if n and finite:
        centred = np.linalg.norm(ref - ref.mean(axis=1, keepdims=True), axis=1)
        within = (cos >= tolerance.min_cosine) & (diff.max(axis=1) <= tolerance.max_tie_error * centred)
        flips, ties = top1_flips(ref, cand, within=within)
    else:
        flips = ties = np.ones(n, bool) if not finite else np.zeros(0, bool)
    t = tolerance
    res = ParityResult(
        name=name,
        samples=n,
        max_abs=max_abs if finite else float("inf"),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=max_abs / max(scale, 1e-12) if finite else float("inf"),
        min_cosine=float(cos.min()) if n else 1.0,
        mean_cosine=float(cos.mean()) if n else 1.0,
        top1_agreement=float((ref.argmax(1) == cand.argmax(1)).mean()) if n else 1.0,
        tolerance=t,
        flips=int(flips.sum()) if finite else n,
        near_ties=int(ties.sum()) if finite else 0,
        low_cosine=int((~(cos >= t.min_cosine)).sum()),
        judged=bool(judged),
    )
    res.flip_bound = upper_bound(res.flips, n, t.confidence)
    if not finite:
        res.failures.append("non-finite logits (NaN or Inf)")
    if res.max_abs > t.max_abs:
        res.failures.append(f"max abs diff {res.max_abs:.3g} > {t.max_abs:.3g}")
    if res.max_rel > t.max_rel:
        res.failures.append(f"max rel diff {res.max_rel:.3g} > {t.max_rel:.3g}")
    if not judged or not finite:
        return res
    if significantly_above(res.low_cosine, n, t.max_low_cosine_share, t.confidence):
        allowed = f"{t.max_low_cosine_share:.1%} allowed" if t.max_low_cosine_share else "none allowed"
        res.failures.append(f"{res.low_cosine} of {n} samples below cosine {t.min_cosine:.6g} ({allowed}; "
                            f"min cosine {res.min_cosine:.6f})")
    if significantly_above(res.flips, n, t.allowed_flips, t.confidence):
        allowed = f"{t.allowed_flips:.1%} allowed" if t.allowed_flips else "none allowed"
        res.failures.append(f"{res.flips} of {n} top-1 flips beyond the logit error ({allowed}; "
                            f"{res.near_ties} near-ties not counted)")
    return res


def format_table(results: list[ParityResult]) -> str:
    """A small fixed-width table of parity results for the terminal."""
    width = max([28] + [len(r.name) + (8 if not r.judged else 0) for r in results])
    head = (f"{'check':<{width}} {'n':>5} {'max abs':>10} {'max rel':>10} {'min cos':>10} {'top-1 agr':>10} "
            f"{'flips (bound)':>15} {'ties':>5}  result")
    lines = [head, "-" * len(head)]
    for r in results:
        verdict = "ok" if r.passed else "FAIL: " + "; ".join(r.failures)
        name = r.name if r.judged else f"{r.name} [smoke]"
        flips = f"{r.flips} (<={r.flip_bound:.1%})" if r.judged else "-"
        lines.append(
            f"{name:<{width}} {r.samples:>5} {r.max_abs:>10.3g} {r.max_rel:>10.3g} {r.min_cosine:>10.6f} "
            f"{r.top1_agreement:>9.1%} {flips:>15} {r.near_ties:>5}  {verdict}"
        )
    if any(not r.judged for r in results):
        lines.append("[smoke]: out-of-domain or random inputs, magnitude checks only; decisions are judged on the "
                     "held-out in-domain rows.")
    return "\n".join(lines)


def require_passed(results: list[ParityResult], what: str) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        raise ParityError(
            f"{what} failed its parity check:\n{format_table(results)}"
        )
