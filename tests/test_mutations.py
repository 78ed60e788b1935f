"""Every file format atexport reads, mutated a few hundred times: each mutation loads or ends in AtexportError.

Formats and mutations are in ``tests/_mutators.py`` (``bench/fuzz_formats.py`` runs thousands) and, for
the files of run folders and sweep cells and an OpenVINO IR's metadata, ``tests/_mutators_runs.py``. A
crash (any exception other than atexport's own) is a reader that lets damage through to a traceback.
"""

from __future__ import annotations

import collections

import pytest

from _mutators import FORMATS, build_context, fuzz, run_one
from _mutators_runs import RUN_FORMATS, build_run_context

# Mutations per format in the suite (seeded: the same files every run).
COUNTS = {"metadata": 400, "sidecar": 300, "task_npz": 300, "run_pt": 250, "calibration_cache": 300, "recipe": 250,
          "metrics_jsonl": 250, "run_config": 200, "verify_json": 200, "sweep_cell": 150, "openvino_metadata": 250}
ALL = {**FORMATS, **RUN_FORMATS}


@pytest.fixture(scope="module")
def base_ctx(tmp_path_factory, tiny_ckpt):
    return build_context(tmp_path_factory.mktemp("fuzz"), tiny_ckpt)


@pytest.fixture(scope="module")
def run_ctx(tmp_path_factory, tiny_ckpt):
    from atexport.export.onnx import export_onnx
    from atexport.export.settings import ExportSettings

    d = tmp_path_factory.mktemp("fuzz_runs")
    export_onnx(tiny_ckpt, d / "fused.onnx", ExportSettings(verify=False))
    return build_run_context(d, tiny_ckpt, d / "fused.onnx")


@pytest.fixture
def ctx(request, name):
    return request.getfixturevalue("run_ctx" if name in RUN_FORMATS else "base_ctx")


@pytest.mark.parametrize("name", list(ALL))
def test_the_unmutated_file_loads(ctx, name):
    fmt = ALL[name]
    outcome = run_one(fmt, fmt.base(ctx), ctx, "unmutated")
    assert outcome.kind == "ok", outcome


@pytest.mark.parametrize("name", list(ALL))
def test_every_mutation_loads_or_is_refused_by_atexport(ctx, name):
    fmt = ALL[name]
    counts = collections.Counter()
    crashes = []
    for outcome in fuzz(fmt, ctx, COUNTS[name], seed=0):
        counts[outcome.kind] += 1
        if outcome.kind == "crash":
            crashes.append(outcome)
    assert not crashes, (
        f"{len(crashes)} of {COUNTS[name]} mutations of {name} crashed the reader; first: "
        f"{crashes[0].description}: {crashes[0].detail}\n{crashes[0].trace}"
    )
    # the mutations must really exercise the reader: most are refused, some still load
    assert counts["refused"] >= COUNTS[name] // 4, counts
    assert counts["ok"] + counts["refused"] == COUNTS[name]
