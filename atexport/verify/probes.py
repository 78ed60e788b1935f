"""Family diagnostics in ``atexport verify``: checks beyond the logits that an adapter family asks for.

An adapter family may name *probes* (:meth:`atexport.adapters.base.AdapterFamily.probes`): values it
can read in its PyTorch model and expose in an exported ONNX graph (Adapter-X: the routing
probabilities, :class:`atexport.adapters.routing.RoutingCheck`). :func:`check_probes` runs each probe in
PyTorch and in every ONNX Runtime artifact on the same images, and returns the probe's comparison rows;
backends where the values cannot be observed (TensorRT engines, other runtimes) get a row saying so.
Multi-task verify (:mod:`atexport.verify.multitask`) calls it once per task, with that task's PyTorch model
and images and the task id fed as an extra input (``feeds``); the rows then carry the ``task``.
Nothing here knows a family: verify shows whatever rows the family's probes return.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def check_probes(adapter_config, model, loaded: Sequence, x: np.ndarray, threads: int | None = None,
                 feeds: Callable[[object], dict] | None = None, task: str | None = None) -> list[dict]:
    """Every probe of ``adapter_config``'s family, PyTorch ``model`` against each artifact, on images ``x``.

    Args:
        adapter_config: the checkpoint's (export-layout) adapter config; ``None``: no probes.
        model: the PyTorch model the artifacts were exported from.
        loaded: the :class:`~atexport.runtime.artifacts.LoadedArtifact` objects verified.
        x: preprocessed images ``[N, C, H, W]`` (what the artifacts were fed).
        threads: ONNX Runtime threads.
        feeds: ``feeds(item) -> {input name: per-sample array [N]}``, fed beside ``x`` to that artifact
            (multi-task models: the task id of every image); ``None``: the images only.
        task: the task whose model and images these are (multi-task verify); added to each row.

    Returns:
        One dict per (probe, artifact): the probe's comparison (``passed``, ``summary``, numbers) plus
        ``probe``, ``title``, ``name`` (the backend row), ``artifact`` and, given ``task``, ``task``.
    """
    if adapter_config is None:
        return []
    from atexport.adapters import family_of

    probes = family_of(adapter_config).probes(adapter_config)
    rows = []
    for probe in probes:
        ref = probe.reference(model, x)
        for item in loaded:
            row = {"probe": probe.name, "title": probe.title, "name": item.name, "artifact": str(item.artifact.path)}
            if task is not None:
                row["task"] = str(task)
            if item.backend != "onnxruntime":
                row.update(observed=False, passed=True,
                           summary=f"not observable in the {item.backend} artifact (intermediate tensors are not "
                                   "exposed); verify the ONNX model it was built from")
            else:
                row.update(_run_probe(probe, item, ref, x, threads, feeds(item) if feeds else None))
            rows.append(row)
    return rows


def _run_probe(probe, item, ref: np.ndarray, x: np.ndarray, threads, feeds: dict | None = None) -> dict:
    """The probe in one ONNX Runtime artifact: its graph with the probe's tensors exposed, run on ``x`` (and
    ``feeds``, per-sample arrays sliced and padded with ``x``) in the artifact's batch size."""
    import onnx

    from atexport.runtime.onnxruntime import OnnxRuntimeRunner

    exposed = probe.expose(onnx.load(str(item.artifact.path)))
    if exposed is None:
        return {"observed": False, "passed": True, "summary": "not observable: the graph does not show it"}
    marked, names = exposed
    fixed = item.batch
    got: dict[str, list] = {n: [] for n in names}
    with OnnxRuntimeRunner(marked.SerializeToString(), threads=threads, name=item.name) as runner:
        step = int(fixed or len(x))
        for s in range(0, len(x), step):
            chunk = x[s:s + step]
            extra = {k: np.ascontiguousarray(v[s:s + step]) for k, v in (feeds or {}).items()}
            n = len(chunk)
            if fixed and n < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
                extra = {k: np.concatenate([v, np.repeat(v[-1:], fixed - n, axis=0)]) for k, v in extra.items()}
            res = runner.run(chunk, output_names=names, **extra)
            for k in names:
                got[k].append(np.asarray(res[k], np.float32)[:n])
    return probe.compare(ref, [np.concatenate(got[k]) for k in names], item.precision)


def probe_lines(rows: Sequence[dict]) -> list[str]:
    """One line per probe row, for the terminal table and the Markdown report."""
    return [f"{r['title']} ({probe_label(r)}): {r['summary']}" for r in rows]


def probe_label(row: dict) -> str:
    """The row's backend, and its task where it has one (multi-task verify): ``onnxruntime fp32 [cars]``."""
    return f"{row['name']} [{row['task']}]" if row.get("task") else str(row["name"])
