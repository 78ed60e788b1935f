"""The one batched-run helper: any number of samples through a runner in chunks the model accepts.

A fixed-batch model (e.g. an engine built for batch 8) takes exactly its batch, so the last chunk is
padded by repeating its final sample and the padding is trimmed from the output. Per-sample inputs
(a multi-task model's ``task_id``) are chunked and padded with the images; other feeds go with every
chunk. Verify, bench, precision probes, calibration and the app runtime all run through here.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np


def run_batched(runner, inputs: np.ndarray, batch_size: int, *, pad: bool = True,
                per_sample: Mapping[str, np.ndarray] | None = None, feeds: Mapping | None = None,
                timings: list | None = None) -> np.ndarray:
    """Logits of ``inputs`` run through ``runner`` in chunks of ``batch_size``.

    Args:
        runner: an active :class:`~atexport.runtime.base.Runner`.
        inputs: the float32 NCHW batch.
        batch_size: chunk size (a fixed-batch model's batch).
        pad: pad the last chunk to ``batch_size`` (fixed-batch models); ``False`` runs it as it is.
        per_sample: inputs with one row per sample (e.g. ``{"task_id": ids}``), chunked with the images.
        feeds: inputs given unchanged with every chunk (e.g. a task selection).
        timings: if given, the seconds spent in each ``runner.infer`` call are appended to it.

    Returns:
        The outputs of every sample, in order (``(0, 0)`` float32 for no samples).
    """
    size = max(int(batch_size), 1)
    outs = []
    for i in range(0, len(inputs), size):
        x = inputs[i : i + size]
        extra = {k: np.asarray(v)[i : i + size] for k, v in (per_sample or {}).items()}
        n = len(x)
        if pad and n < size:
            x = np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])
            extra = {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in extra.items()}
        t0 = time.perf_counter()
        y = runner.infer(np.ascontiguousarray(x), **dict(feeds or {}), **extra)
        if timings is not None:
            timings.append(time.perf_counter() - t0)
        outs.append(np.asarray(y)[:n])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
