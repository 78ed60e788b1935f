"""Reports of ``atexport verify`` (and ``atexport bench``) on disk: JSON for tools, Markdown for people.

Both are written atomically into the report folder: ``verify.json`` holds every number of
:class:`~atexport.verify.result.VerifyResult` or
:class:`~atexport.verify.result.MultiTaskVerifyResult` (tolerances, machine, per-block stages included);
``verify.md`` the same as tables, ready for a pull request or a model card.
"""

from __future__ import annotations

import os
from pathlib import Path


def _md_table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _verdict(result) -> str:
    return "PASSED" if result.passed else "FAILED"


def _parity_verdict(p) -> str:
    """A row's result cell: ``reference`` (no parity), ``ok`` or the failures in bold."""
    return "reference" if p is None else ("ok" if p.passed else "**FAIL**: " + "; ".join(p.failures))


def _failures_md(result) -> list[str]:
    return ["", "## Failures", ""] + [f"- {f}" for f in result.failures()] if result.failures() else []


def _notes_and_timings_md(result) -> list[str]:
    """The report's end, alike for single- and multi-task results: notes, then timings."""
    lines = ["", "## Notes", ""] + [f"- {n}" for n in result.notes] if result.notes else []
    return lines + ["", "Timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()), ""]


def verify_markdown(result) -> str:
    """The Markdown report of a :class:`~atexport.verify.result.VerifyResult`."""
    from atexport.utils.machine import machine_line

    lines = [
        f"# atexport verify: {_verdict(result)}",
        "",
        f"Checkpoint `{result.checkpoint}` on `{result.dataset}` ({result.split} split, {result.samples} images, "
        f"batch {result.batch_size}). Machine: {machine_line(result.machine)}. Date: {result.machine.get('date')}.",
        "",
        "PyTorch FP32 runs on timm's eval transform; every artifact on atexport's torch-free preprocessing "
        "(numpy + Pillow), as an app runs it.",
        "",
    ]
    rows = []
    for b in [result.reference, *result.backends]:
        p = b.parity
        rows.append([
            b.name, f"`{Path(b.path).name}`" if b.path else "-", b.precision, f"{b.accuracy:.2%}", f"{b.agreement:.2%}",
            f"{p.max_abs:.3g}" if p else "-", f"{p.mean_abs:.3g}" if p else "-",
            f"{p.min_cosine:.6f}" if p else "-", f"{p.mean_cosine:.6f}" if p else "-", f"{b.images_per_s:.1f}",
            _parity_verdict(p),
        ])
    lines.append(_md_table(["backend", "file", "precision", "top-1", "agreement", "max abs", "mean abs",
                            "min cos", "mean cos", "images/s", "result"], rows))
    pp = result.preprocess
    if pp:
        lines += ["", f"Preprocessing (numpy/Pillow vs timm): max abs difference {pp['max_abs']:.3g} over "
                      f"{pp['images']} images (tolerance {pp['tolerance']:g}): {'ok' if pp['passed'] else '**FAIL**'}."]
    tol = result.tolerances.get("logits", {})
    if tol:
        lines += ["", f"Tolerances (from `{result.tolerances.get('source')}`):", ""]
        fields = ["max_abs", "max_rel", "min_cosine", "min_top1_agreement"]
        per_block = result.tolerances.get("per_block_max_rel", {})
        lines.append(_md_table(["precision", *fields, "per-block max rel"],
                               [[k, *[f"{v[f]:g}" for f in fields], f"{per_block.get(k, '-')}"]
                                for k, v in tol.items()]))
    lines += _failures_md(result)
    if result.probes:
        from atexport.verify.probes import probe_lines

        lines += ["", "## Family diagnostics", ""] + [f"- {line}" for line in probe_lines(result.probes)]
    for r in result.per_block:
        lines += ["", f"## Per block: `{r.artifact}` ({r.precision}, {r.samples} images)", "", r.summary(), ""]
        lines.append(_md_table(
            ["stage", "graph tensor", "max abs", "rel", "min cos", ""],
            [[s.name, f"`{s.tensor}`", f"{s.max_abs:.3g}", f"{s.rel:.3g}", f"{s.cosine:.6f}",
              "first over tolerance" if s.name == r.first_over else ("largest jump" if s.name == r.jump else "")]
             for s in r.stages]))
    return "\n".join(lines + _notes_and_timings_md(result))


def multitask_markdown(result) -> str:
    """The Markdown report of a :class:`~atexport.verify.result.MultiTaskVerifyResult`."""
    from atexport.utils.machine import machine_line

    models = ", ".join(f"`{Path(m['path']).name}` ({m['precision']}, tasks {', '.join(m['tasks'])})"
                       for m in result.models)
    lines = [
        f"# atexport verify (multi-task): {_verdict(result)}",
        "",
        f"Models {models}; {result.split} split, batch {result.batch_size}. Machine: {machine_line(result.machine)}. "
        f"Date: {result.machine.get('date')}.",
        "",
        "Each task against its own PyTorch FP32 model (its checkpoint, on timm's eval transform), with every "
        "sample given that task; the models run atexport's torch-free preprocessing, as an app does.",
        "",
    ]
    rows = []
    for t in result.tasks:
        for b in [t.reference, *t.backends]:
            p = b.parity
            rows.append([
                t.task, f"`{Path(t.checkpoint).name}`", t.dataset, b.name, f"`{Path(b.path).name}`" if b.path else "-",
                "-" if b.accuracy is None else f"{b.accuracy:.2%}", f"{b.agreement:.2%}",
                f"{p.max_abs:.3g}" if p else "-", f"{p.min_cosine:.6f}" if p else "-", f"{b.images_per_s:.1f}",
                _parity_verdict(p),
            ])
    lines.append(_md_table(["task", "checkpoint", "data set", "backend", "file", "top-1", "agreement", "max abs",
                            "min cos", "images/s", "result"], rows))
    if result.mixed:
        lines += ["", "## Mixed-task batches", "",
                  "The verified tasks' images interleaved in one batch (task ids 0 1 2 0 1 2 ...); each task's rows "
                  "against the same model's single-task rows.", ""]
        lines.append(_md_table(
            ["task", "backend", "file", "rows", "batch", "tasks in batch", "max abs", "min cos", "result"],
            [[m.task, m.name, f"`{Path(m.path).name}`", m.parity.samples, m.batch_size, ", ".join(m.tasks_in_batch),
              f"{m.parity.max_abs:.3g}", f"{m.parity.min_cosine:.6f}",
              "ok" if m.passed else "**FAIL**: " + "; ".join(m.parity.failures)] for m in result.mixed]))
    pre = [f"{t.task} {t.preprocess['max_abs']:.3g}" for t in result.tasks]
    lines += ["", "Preprocessing (numpy/Pillow vs timm), max abs difference: " + ", ".join(pre) + "."]
    if result.probes:
        lines += ["", "## Family diagnostics", "",
                  "Each task's first images in its own PyTorch model against every model fed that task's id.", ""]
        lines.append(_md_table(
            ["task", "diagnostic", "backend", "file", "result"],
            [[r.get("task", "-"), r["title"], r["name"], f"`{Path(r['artifact']).name}`",
              r["summary"] if r.get("passed", True) else "**FAIL**: " + r["summary"]] for r in result.probes]))
    return "\n".join(lines + _failures_md(result) + _notes_and_timings_md(result))


def write_verify_report(result, folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``verify.json`` and ``verify.md`` into ``folder`` (created if needed); returns their paths."""
    from atexport.utils.io import atomic_write_json, atomic_write_text, check_writable

    folder = Path(folder)
    json_path = check_writable(folder / "verify.json", "--report")
    md_path = folder / "verify.md"
    result.reports = {"json": json_path, "markdown": md_path}
    atomic_write_json(json_path, result.to_dict())
    atomic_write_text(md_path, result.markdown())
    return result.reports


def bench_markdown(result) -> str:
    """A Markdown table of a :class:`~atexport.benchmark.BenchResult` (for RESULTS.md-style notes)."""
    from atexport.utils.machine import machine_line

    rows = [[r.name, r.device, r.batch, f"{r.latency_ms['p50']:.2f}", f"{r.latency_ms['p90']:.2f}",
             f"{r.latency_ms['p99']:.2f}", f"{r.throughput:.1f}", f"{r.speedup:.2f}x" if r.speedup else "-"]
            for r in result.rows]
    c = result.config
    return "\n".join([
        f"Machine: {machine_line(result.machine)}. Date: {result.machine.get('date')}.",
        f"Input {c.get('input')}, {c.get('runs')} timed runs after {c.get('warmup')} warm-up runs per row.",
        "",
        _md_table(["backend", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "vs eager"], rows),
    ] + ([""] + [f"- {n}" for n in result.notes] if result.notes else []))
