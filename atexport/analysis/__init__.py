"""The paper's experiments as library calls: rank sweeps, adapter spectra, run reports.

- :func:`run_sweep` trains a grid of (adapter family, rank, every, seed) cells with the existing
  trainer, resumably, one cell per process under ``torchrun``; writes ``sweep.json``, ``sweep.md``
  and ``sweep.png`` with the elbow (the smallest rank within a tolerance of the best).
- :func:`analyze_checkpoint` measures the singular values of each adapter's linearised update
  (``up.weight @ down.weight``), its effective rank at 90/95/99% energy, and recommends a rank.
- :func:`build_report` turns finished run folders into the paper-style table, training curves and the
  per-backend accuracy of their verify reports.

Plots need matplotlib (``pip install "atexport[plot]"``); without it every command still writes its
JSON and Markdown and says in one line how to get the plots. Importing this package imports neither
torch nor matplotlib.
"""

from atexport.analysis.report import ReportResult, build_report
from atexport.analysis.spectrum import SpectrumResult, analyze_checkpoint, effective_rank
from atexport.analysis.sweep import SweepResult, elbow, run_sweep

__all__ = [
    "ReportResult",
    "SpectrumResult",
    "SweepResult",
    "analyze_checkpoint",
    "build_report",
    "effective_rank",
    "elbow",
    "run_sweep",
]
