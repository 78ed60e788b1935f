"""Every file format atexport reads, mutated a few hundred times: each mutation loads or ends in AtexportError.

Formats and mutations are in ``tests/_mutators.py`` (``bench/fuzz_formats.py`` runs thousands). A crash
(any exception other than atexport's own) is a reader that lets damage through to a traceback.
"""

from __future__ import annotations

import collections

import pytest

from _mutators import FORMATS, build_context, fuzz, run_one

# Mutations per format in the suite (seeded: the same files every run).
COUNTS = {"metadata": 400, "sidecar": 300, "task_npz": 300, "run_pt": 250, "calibration_cache": 300, "recipe": 250}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_ckpt):
    return build_context(tmp_path_factory.mktemp("fuzz"), tiny_ckpt)


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_unmutated_file_loads(ctx, name):
    fmt = FORMATS[name]
    outcome = run_one(fmt, fmt.base(ctx), ctx, "unmutated")
    assert outcome.kind == "ok", outcome


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_mutation_loads_or_is_refused_by_atexport(ctx, name):
    fmt = FORMATS[name]
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
