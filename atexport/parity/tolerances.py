"""Tolerances: the one reader of ``export_configs/tolerances.yaml`` (or a user's table) and its overrides.

Every check reads its limits here: the per-precision logit limits (:class:`Tolerance`, judged by
:func:`atexport.parity.compare.compare`), the per-block limits of ``verify --per-block`` and of locating
where a precision model breaks, and the preprocessing limit of ``verify``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from atexport import configs
from atexport.errors import BadInputError


@dataclass
class Tolerance:
    """Limits an artifact's logits must meet against the reference (usually the PyTorch FP32 model).

    Attributes:
        max_abs: largest allowed absolute logit difference.
        max_rel: largest allowed ``max_abs / max |reference logit|``.
        min_cosine: a sample whose logit cosine similarity is below this is an outlier.
        min_top1_agreement: ``1 - min_top1_agreement`` is the allowed share of top-1 flips (near-ties aside).
        max_low_cosine_share: the allowed share of cosine outliers (0: none).
        max_tie_error: a disagreement can be a near-tie only where the sample's largest logit error is at most
            this share of its (centred) reference logit norm: the error band in which decisions are coin flips.
        confidence: confidence of the tests that the flips' and outliers' shares exceed what is allowed.
    """

    max_abs: float = 1e-4
    max_rel: float = 1e-4
    min_cosine: float = 0.99999
    min_top1_agreement: float = 1.0
    max_low_cosine_share: float = 0.0
    max_tie_error: float = 1e-3
    confidence: float = 0.95

    @classmethod
    def from_dict(cls, d: dict) -> "Tolerance":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise BadInputError(f"unknown tolerance fields {sorted(unknown)}; expected {list(cls.__dataclass_fields__)}.")
        try:
            t = cls(**{k: float(v) for k, v in d.items()})
        except (TypeError, ValueError):
            raise BadInputError(f"tolerance values must be numbers, got {d}.") from None
        if not 0.0 < t.confidence < 1.0:
            raise BadInputError(f"tolerance confidence {t.confidence:g}: expected a number between 0 and 1, e.g. 0.95.")
        return t

    @property
    def allowed_flips(self) -> float:
        """The allowed share of top-1 flips."""
        return max(0.0, 1.0 - self.min_top1_agreement)


@dataclass
class Tolerances:
    """The resolved limits of one verification."""

    logits: dict[str, Tolerance]
    per_block: dict[str, float]
    preprocess_max_abs: float
    source: str

    def to_dict(self) -> dict:
        return {"logits": {k: asdict(v) for k, v in self.logits.items()}, "per_block_max_rel": self.per_block,
                "preprocess_max_abs": self.preprocess_max_abs, "source": self.source}


def resolve_tolerances(tolerances: str | os.PathLike | Mapping = "tolerances",
                       overrides: Mapping[str, Any] | None = None) -> Tolerances:
    """Load a tolerance table (name in ``export_configs/``, YAML path, or dict) and apply overrides.

    Args:
        tolerances: the table.
        overrides: ``{"int8.min_cosine": 0.99, "per_block.fp16": 0.02, "preprocess_max_abs": 1e-3}``.
    """
    data = dict(tolerances) if isinstance(tolerances, Mapping) else configs.load("export_configs", tolerances)
    source = str(data.get("_source", "dict"))
    table = data.get("tolerances", {})
    if not isinstance(table, dict) or not table:
        raise BadInputError(f"--tolerances {source}: no 'tolerances:' table (fp32, fp16, int8 limits) in it.")
    logits = {k: Tolerance.from_dict(v) for k, v in table.items() if isinstance(v, dict)}
    per_block = {k: float(v) for k, v in (data.get("per_block_max_rel") or {}).items()}
    pre = float(data.get("preprocess_max_abs", 1e-4))
    for key, value in (overrides or {}).items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise BadInputError(f"--tol {key}={value}: the value must be a number.") from None
        parts = str(key).split(".")
        if parts == ["preprocess_max_abs"]:
            pre = value
        elif len(parts) == 2 and parts[0] == "per_block":
            per_block[parts[1]] = value
        elif len(parts) == 2 and parts[0] in logits and parts[1] in Tolerance.__dataclass_fields__:
            setattr(logits[parts[0]], parts[1], value)
        else:
            fields = ", ".join(Tolerance.__dataclass_fields__)
            raise BadInputError(
                f"--tol {key}: unknown tolerance; use PRECISION.FIELD (precisions {sorted(logits)}, fields {fields}), "
                "per_block.PRECISION or preprocess_max_abs."
            )
    return Tolerances(logits, per_block, pre, source)




def load_tolerances(name: str | os.PathLike | Mapping = "tolerances") -> dict[str, Tolerance]:
    """Per-precision logit tolerances of a table (name in ``export_configs/``, YAML path, or dict)."""
    return resolve_tolerances(name).logits


def per_block_tolerance(precision: str, tolerances: str | os.PathLike | Mapping = "tolerances") -> float:
    """The per-block relative tolerance of ``precision`` (``per_block_max_rel`` of the table)."""
    tol = resolve_tolerances(tolerances)
    if precision not in tol.per_block:
        raise BadInputError(f"no per-block tolerance for {precision!r} (per_block_max_rel in {tol.source}); "
                            f"have {sorted(tol.per_block)}.")
    return tol.per_block[precision]
