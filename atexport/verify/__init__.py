"""Accuracy parity between artifacts: comparison of any two runners, tolerances per precision."""

from atexport.verify.compare import ParityResult, Tolerance, compare, format_table, load_tolerances

__all__ = ["ParityResult", "Tolerance", "compare", "format_table", "load_tolerances"]
