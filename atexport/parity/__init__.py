"""Comparing outputs: tolerances (one loader), comparison rows and tables, photo and random batches.

The kernel every check in atexport runs on: an export's own parity check, ``atexport verify``, the
precision stage and the engine build all compare two runners' logits with :func:`compare` against the
tolerances of the artifact's precision, on the same inputs (:mod:`atexport.parity.images`).
"""

from atexport.parity.check import ParitySettings, check_parity
from atexport.parity.compare import ParityResult, Tolerance, compare, format_table, load_tolerances, require_passed
from atexport.parity.images import photo_batch, random_batch, sample_images

__all__ = ["ParityResult", "ParitySettings", "Tolerance", "check_parity", "compare", "format_table", "load_tolerances",
           "photo_batch", "random_batch", "require_passed", "sample_images"]
