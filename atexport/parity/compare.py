"""Comparing the logits of two runners against per-precision tolerances.

Tolerances are data (``export_configs/tolerances.yaml``). A result outside tolerance is a failure
(:class:`~atexport.errors.ParityError` where the caller asks for it), never a warning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from atexport import configs
from atexport.errors import BadInputError, ParityError


@dataclass
class Tolerance:
    """Limits an artifact's logits must meet against the PyTorch FP32 reference.

    Attributes:
        max_abs: largest allowed absolute logit difference.
        max_rel: largest allowed ``max_abs / max |reference logit|``.
        min_cosine: smallest allowed per-sample cosine similarity of the logit vectors.
        min_top1_agreement: smallest allowed share of samples with the same top-1 class.
    """

    max_abs: float = 1e-4
    max_rel: float = 1e-4
    min_cosine: float = 0.99999
    min_top1_agreement: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "Tolerance":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise BadInputError(f"unknown tolerance fields {sorted(unknown)}; expected {list(cls.__dataclass_fields__)}.")
        return cls(**{k: float(v) for k, v in d.items()})


@dataclass
class ParityResult:
    """Numbers of one comparison (reference vs candidate) and whether they pass."""

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

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def load_tolerances(name: str = "tolerances") -> dict[str, Tolerance]:
    """Per-precision tolerances from ``export_configs/<name>.yaml`` (keys fp32, fp16, int8)."""
    data = configs.load("export_configs", name)
    table = data.get("tolerances", data)
    return {k: Tolerance.from_dict(v) for k, v in table.items() if isinstance(v, dict)}


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, name: str = "candidate") -> ParityResult:
    """Compare two logit arrays of shape (N, C)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ParityError(f"{name}: output shape {cand.shape} differs from the reference's {ref.shape}.")
    diff = np.abs(ref - cand)
    finite = bool(np.isfinite(cand).all())
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    num = (ref * cand).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(ref - cand).sum(axis=1) == 0, 1.0, 0.0))
    agree = float((ref.argmax(1) == cand.argmax(1)).mean()) if len(ref) else 1.0
    res = ParityResult(
        name=name,
        samples=int(len(ref)),
        max_abs=max_abs if finite else float("inf"),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=max_abs / max(scale, 1e-12) if finite else float("inf"),
        min_cosine=float(cos.min()) if len(cos) else 1.0,
        mean_cosine=float(cos.mean()) if len(cos) else 1.0,
        top1_agreement=agree,
        tolerance=tolerance,
    )
    t = tolerance
    if not finite:
        res.failures.append("non-finite logits (NaN or Inf)")
    if res.max_abs > t.max_abs:
        res.failures.append(f"max abs diff {res.max_abs:.3g} > {t.max_abs:.3g}")
    if res.max_rel > t.max_rel:
        res.failures.append(f"max rel diff {res.max_rel:.3g} > {t.max_rel:.3g}")
    if res.min_cosine < t.min_cosine:
        res.failures.append(f"min cosine {res.min_cosine:.6f} < {t.min_cosine:.6f}")
    if res.top1_agreement < t.min_top1_agreement:
        res.failures.append(f"top-1 agreement {res.top1_agreement:.2%} < {t.min_top1_agreement:.2%}")
    return res


def format_table(results: list[ParityResult]) -> str:
    """A small fixed-width table of parity results for the terminal."""
    head = f"{'check':<28} {'n':>5} {'max abs':>10} {'max rel':>10} {'min cos':>10} {'top-1 agr':>10}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        verdict = "ok" if r.passed else "FAIL: " + "; ".join(r.failures)
        lines.append(
            f"{r.name:<28} {r.samples:>5} {r.max_abs:>10.3g} {r.max_rel:>10.3g} {r.min_cosine:>10.6f} "
            f"{r.top1_agreement:>9.1%}  {verdict}"
        )
    return "\n".join(lines)


def require_passed(results: list[ParityResult], what: str) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        raise ParityError(
            f"{what} failed its parity check:\n{format_table(results)}"
        )
