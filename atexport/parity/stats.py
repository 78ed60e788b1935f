"""Binomial statistics for parity gates: is a count of bad samples significantly above what is allowed?

A gate that refuses an artifact because 1 of 13 photos flipped its top-1 class judges noise: the same
model passes on one CPU and fails on another. The gates in :mod:`atexport.parity.compare` therefore
refuse only when the observed share of bad samples is *significantly* above the allowed share
(a one-sided exact binomial test), and report the Clopper-Pearson upper confidence bound of the share,
so a reader sees how much the samples can tell. Pure Python: the torch-free runtime may import this.
"""

from __future__ import annotations

import math


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k, n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
    return min(total, 1.0)


def significantly_above(k: int, n: int, allowed: float, confidence: float = 0.95) -> bool:
    """Whether ``k`` bad samples of ``n`` show a bad share above ``allowed`` at ``confidence``.

    With ``allowed == 0`` any bad sample is significant (float-rounding gates stay exact); with few samples
    only a gross excess is (1 flip of 13 is not evidence against an allowed 1%).
    """
    if k <= 0 or n <= 0:
        return False
    if allowed <= 0.0:
        return True
    return binomial_sf(k, n, allowed) < 1.0 - confidence


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper confidence bound of a share from ``k`` bad samples of ``n``."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    lo, hi = k / n, 1.0
    for _ in range(60):  # P(X <= k | p) falls as p grows: find where it equals alpha
        mid = (lo + hi) / 2
        if 1.0 - binomial_sf(k + 1, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi
