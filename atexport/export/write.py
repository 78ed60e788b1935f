"""The one "verify, then write atomically, or keep ``.failed``" step of every export.

An exported artifact (an ONNX model from ``atexport onnx``, a precision model, a multi-task model) is
written where the user asked only once its parity rows all pass; one that fails is written atomically
beside it as ``<stem>.failed<suffix>`` (for inspection) and a :class:`~atexport.errors.ParityError`
names both paths. A good file is never replaced by a bad one, and a half-written file never appears.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from atexport.errors import ParityError


def write_verified(
    data: bytes,
    output: str | os.PathLike,
    rows: Sequence,
    what: str,
    *,
    verify: bool = True,
    failed_path: str | os.PathLike | None = None,
    result: Any = None,
    only_failed: bool = False,
) -> Path:
    """Write ``data`` to ``output`` atomically when every parity row passed; else keep a ``.failed`` copy and raise.

    Args:
        data: the serialized artifact.
        output: where it goes.
        rows: the parity rows (:class:`~atexport.parity.compare.ParityRow`-like: ``.passed``), empty when
            not verified.
        what: what failed, as the start of a sentence: ``"the int8 model does not match onnx-fp32 within
            the int8 tolerances"``.
        verify: whether the rows count; ``False`` (verification skipped) writes ``output`` as it is.
        failed_path: where a failing artifact is kept (default ``<stem>.failed<suffix>`` beside ``output``).
        result: the caller's result object, if any: its ``failed_path`` is set and it rides on the
            error as ``error.result``, so a caller can still read the failing rows.
        only_failed: list only the failing rows in the error's table (many rows, e.g. one per task).

    Returns:
        ``output`` as a :class:`~pathlib.Path`.

    Raises:
        ParityError: some row failed; nothing was written at ``output`` (``error.failed_path`` is the kept copy).
    """
    from atexport.utils.io import atomic_write_bytes

    output = Path(output)
    if verify and not all(r.passed for r in rows):
        from atexport.artifact.onnx import failed_path_for
        from atexport.parity.compare import format_table

        failed = Path(failed_path if failed_path is not None else failed_path_for(output))
        atomic_write_bytes(failed, data)
        shown = [r for r in rows if not r.passed] if only_failed else list(rows)
        err = ParityError(
            f"{what}:\n{format_table(shown)}\n"
            f"Nothing was written to {output}; the failing model is kept at {failed}."
        )
        err.failed_path = failed
        if result is not None:
            result.failed_path = failed
            err.result = result
        raise err
    return atomic_write_bytes(output, data)



def write_export(proto, data: bytes, result, output, what: str, *, verify: bool, seconds: dict, t_start: float,
                 failed_path=None, only_failed: bool = False) -> Path:
    """The end of an ONNX export: record the parity rows in the model's metadata (when verified), fill
    ``result``'s timings and size, and :func:`write_verified` the file.

    Args:
        proto: the exported ``onnx.ModelProto`` (its metadata is ``result.metadata``).
        data: ``proto`` serialized as it was verified (serialized again only when the rows are recorded).
        result: the export's result (``metadata``, ``parity``; ``seconds``, ``size_bytes``, ``path`` are set).
        output, what, failed_path, only_failed: as in :func:`write_verified`.
        verify: whether the parity rows were computed.
        seconds: the timings so far; ``total`` is added from ``t_start`` (``time.perf_counter()``).
    """
    import time

    from atexport.artifact.metadata import write_onnx_metadata

    if verify:
        result.metadata.extra["parity"] = [r.to_dict() for r in result.parity]
        write_onnx_metadata(proto, result.metadata)
        data = proto.SerializeToString()
    seconds["total"] = time.perf_counter() - t_start
    result.seconds = seconds
    result.size_bytes = len(data)
    result.path = write_verified(data, output, result.parity or [], what, verify=verify, failed_path=failed_path,
                                 result=result, only_failed=only_failed)
    return result.path
