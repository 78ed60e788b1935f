"""The exception tree of atexport.

Every error a user can cause derives from :class:`AtexportError`; the CLI turns these into one message
and a nonzero exit code (no traceback). Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class AtexportError(Exception):
    """Root of atexport's errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class BadInputError(AtexportError):
    """A file, flag or value the user gave is unusable (missing, corrupt, out of range)."""

    exit_code = 2


class IncompatibleCheckpointError(AtexportError):
    """A checkpoint or model does not fit what it is combined with (backbone, rank, classes)."""

    exit_code = 3


class MissingDependencyError(AtexportError):
    """An optional library (or hardware) needed for this step is not available."""

    exit_code = 4


class ParityError(AtexportError):
    """An exported artifact does not compute what the PyTorch model computes, within tolerance."""

    exit_code = 5


def require(module: str, purpose: str, extra: str | None = None):
    """Import ``module`` or raise :class:`MissingDependencyError` with one clear sentence.

    Args:
        module: importable module name, e.g. ``"onnxruntime"``.
        purpose: what it is needed for, e.g. ``"running ONNX models"``.
        extra: the pip extra of atexport that brings it, e.g. ``"onnx"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"pip install 'atexport[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(
            f"{module} is not installed; it is needed for {purpose}. Install it with: {hint} ({e})."
        ) from None
