"""The text files of a run folder, one reader each: ``metrics.jsonl``, ``config.yaml`` and ``verify.json``.

``atexport train`` writes them; ``report``, ``sweep`` and the trainer's resume read them, always through
these readers, so a file that parses but holds the wrong types (a line ``[1, 2]``, a test score
``"abc"``, a config that is a list) ends in one :class:`~atexport.errors.BadInputError` naming the file
and what to do, never in a ``KeyError`` or ``AttributeError`` later. The messages name the file, not a
flag: these files are found inside folders the user gave, not given one by one. ``run.pt`` has its own
reader (:func:`atexport.checkpoint.load_checkpoint`, called with ``flag=None``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from atexport.errors import BadInputError

METRICS, CONFIG, VERIFY = "metrics.jsonl", "config.yaml", "verify.json"
_FIX = "retrain the run, or restore the file"


@dataclass
class RunMetrics:
    """What ``metrics.jsonl`` holds: the epoch rows in order and the final test row (``None``: unfinished)."""

    history: list = field(default_factory=list)
    test: dict | None = None

    @property
    def finished(self) -> bool:
        return self.test is not None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path: str | Path) -> RunMetrics:
    """Read ``metrics.jsonl``: one JSON object per line, epoch rows then an optional ``event: test`` row.

    Raises:
        BadInputError: an unreadable or empty file, a line that is not a JSON object, or a row whose
            ``epoch`` is not a positive integer or whose scores are not finite numbers.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e}); {_FIX}.") from None
    out = RunMetrics()
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise BadInputError(f"{path}: line {i} is not JSON; the file is damaged ({_FIX}).") from None
        if not isinstance(row, dict):
            raise BadInputError(f"{path}: line {i} is a JSON {type(row).__name__}, not an object; the file is "
                                f"damaged ({_FIX}).")
        event = row.get("event", "epoch")
        if event not in ("epoch", "test"):
            raise BadInputError(f"{path}: line {i} has event {event!r}; expected 'epoch' or 'test' ({_FIX}).")
        epoch = row.get("epoch")
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0) and (
                event == "epoch" or epoch is not None):
            raise BadInputError(f"{path}: line {i} has epoch {epoch!r}; expected a whole number ({_FIX}).")
        for k, v in row.items():
            if (k.endswith(("_top1", "_top5", "_loss")) or k == "lr") and v is not None and not _is_number(v):
                raise BadInputError(f"{path}: line {i} has {k} {v!r}; expected a finite number ({_FIX}).")
        if event == "test":
            if not _is_number(row.get("test_top1")):
                raise BadInputError(f"{path}: line {i} (the test score) has no test_top1 number ({_FIX}).")
            out.test = row
        elif out.test is not None:
            raise BadInputError(f"{path}: line {i} is an epoch after the test score; the file is damaged ({_FIX}).")
        else:
            out.history.append(row)
    if not out.history and out.test is None:
        raise BadInputError(f"{path}: holds no epoch; the file is empty or damaged ({_FIX}).")
    return out


def metrics_finished(path: str | Path) -> bool:
    """Whether ``metrics.jsonl`` is readable and ends with the test score (damaged or missing: ``False``)."""
    try:
        return read_metrics(path).finished
    except BadInputError:
        return False


def read_run_config(path: str | Path) -> dict:
    """Read a run's ``config.yaml`` (safe YAML, no tags run): a mapping of training keys.

    Raises:
        BadInputError: unreadable, not YAML, or not a mapping.
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e}); {_FIX}.") from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise BadInputError(f"{path}: not valid YAML{at}; {_FIX}.") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise BadInputError(f"{path}: a run's config is a mapping of training keys, not a {type(doc).__name__}; "
                            f"{_FIX}.")
    return doc


def read_verify(path: str | Path) -> dict:
    """Read an ``atexport verify`` report: ``{dataset, split, samples, passed, backends: [{backend, precision,
    accuracy, agreement}]}`` (the reference first).

    Raises:
        BadInputError: unreadable, not JSON, or fields of the wrong type.
    """
    path = Path(path)
    fix = "rerun 'atexport verify' to rewrite it, or delete it"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadInputError(f"{path}: not a readable verify report (JSON); {fix}.") from None
    if not isinstance(d, dict):
        raise BadInputError(f"{path}: a verify report is a JSON object, not a {type(d).__name__}; {fix}.")
    backends = d.get("backends") or []
    if not isinstance(backends, list):
        raise BadInputError(f"{path}: 'backends' must be a list; {fix}.")
    rows = []
    for b in [d.get("reference"), *backends]:
        if b is None:
            continue
        if not isinstance(b, dict):
            raise BadInputError(f"{path}: a backend entry is a {type(b).__name__}, not an object; {fix}.")
        row = {"backend": b.get("name"), "precision": b.get("precision"),
               "accuracy": b.get("accuracy"), "agreement": b.get("agreement")}
        for k in ("accuracy", "agreement"):
            if row[k] is not None and not _is_number(row[k]):
                raise BadInputError(f"{path}: {k} {row[k]!r} of backend {row['backend']!r} is not a number; {fix}.")
        for k in ("backend", "precision"):
            if row[k] is not None and not isinstance(row[k], str):
                raise BadInputError(f"{path}: {k} {row[k]!r} is not a name; {fix}.")
        rows.append(row)
    samples = d.get("samples")
    if samples is not None and not (isinstance(samples, int) and not isinstance(samples, bool)):
        raise BadInputError(f"{path}: samples {samples!r} is not a whole number; {fix}.")
    out = {"path": str(path), "samples": samples, "passed": d.get("passed"), "backends": rows}
    for k in ("dataset", "split"):
        v = d.get(k)
        out[k] = v if v is None or isinstance(v, str) else str(v)
    return out


__all__ = ["CONFIG", "METRICS", "VERIFY", "RunMetrics", "metrics_finished", "read_metrics", "read_run_config",
           "read_verify"]
