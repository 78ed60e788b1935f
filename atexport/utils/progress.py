"""Progress with an ETA: a bar on a terminal, one line per step otherwise.

Long stages (training epochs, sweep cells, calibration batches, verification batches) report their
progress through :class:`Progress`. On a terminal (stderr is a TTY) it draws a tqdm bar with rate and
ETA; when stderr is a file or a pipe (CI logs, ``nohup``), when tqdm is absent, or with
``enabled=False`` (``--no-progress``), it writes one plain line per step (throttled with ``every_s``)
through a ``log`` callable, so logs stay readable and greppable. This module imports nothing of atexport and no heavy library (tqdm is imported lazily).

Example:
    >>> with Progress(len(batches), "calibrate", log=print) as bar:
    ...     for b in batches:
    ...         run(b)
    ...         bar.update(1, postfix=f"{b.shape[0]} images")
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

MODES = ("bar", "lines", "off")


def format_seconds(s: float | None) -> str:
    """``75.2`` -> ``"1m15s"``; ``None`` -> ``"?"``."""
    if s is None or s != s or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_mode(enabled: bool = True, stream: TextIO | None = None) -> str:
    """``"bar"`` on a TTY with tqdm installed and ``enabled``; ``"lines"`` otherwise (``--no-progress``)."""
    if not enabled:
        return "lines"
    stream = stream if stream is not None else sys.stderr
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        tty = False
    if not tty:
        return "lines"
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return "lines"
    return "bar"


def eta_seconds(done: float, total: float | None, elapsed: float) -> float | None:
    """Remaining time at the average rate so far (``None`` before the first step or without a total)."""
    if not total or done <= 0:
        return None
    return max(0.0, elapsed / done * (total - done))


class Progress:
    """A progress report over ``total`` steps.

    Args:
        total: number of steps (``None``: unknown, no ETA).
        desc: what is progressing (``"epoch 3/10"``, ``"sweep"``).
        enabled: ``False`` for ``--no-progress``: no bar, one line per step.
        log: receives the plain lines (default: print to stderr).
        unit: the step's name in the bar (``"batch"``, ``"cell"``).
        every_s: in line mode, at most one line per this many seconds (the last step always prints).
        lines: in line mode, whether to write lines at all; a caller that already logs one line per
            step (the trainer's epoch line) passes ``False``.
        mode: force ``"bar"``, ``"lines"`` or ``"off"`` (silent) instead of deciding from the terminal.
        stream: the stream the bar draws on (default stderr).
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
        unit: str = "step",
        every_s: float = 0.0,
        lines: bool = True,
        mode: str | None = None,
        stream: TextIO | None = None,
    ):
        self.total = int(total) if total is not None else None
        self.desc, self.unit, self.every_s = desc, unit, float(every_s)
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.mode = mode or progress_mode(enabled, stream)
        if self.mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {self.mode!r}")
        self.lines = lines and self.mode == "lines"
        self.done = 0
        self.postfix = ""
        self.t0 = time.perf_counter()
        self._last_line = -float("inf")
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, leave=False, dynamic_ncols=True, unit=unit,
                             file=stream if stream is not None else sys.stderr)

    # ---------------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def eta(self) -> float | None:
        """Seconds left at the average rate so far."""
        return eta_seconds(self.done, self.total, self.elapsed)

    def line(self) -> str:
        """The plain status line: ``desc 3/10 (30%) 12s elapsed, ETA 28s  postfix``."""
        if self.total:
            count = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done} {self.unit}s"
        s = f"{self.desc} {count} {format_seconds(self.elapsed)} elapsed"
        if self.total:
            s += f", ETA {format_seconds(self.eta)}"
        return s + (f"  {self.postfix}" if self.postfix else "")

    def set_postfix(self, text: str) -> None:
        """Extra text shown after the counts (loss, accuracy, throughput)."""
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by ``n`` steps; in line mode write a line (throttled by ``every_s``)."""
        self.done += n
        if postfix is not None:
            self.set_postfix(postfix)
        if self._bar is not None:
            self._bar.update(n)
        elif self.lines:
            now = time.perf_counter()
            last = self.total is not None and self.done >= self.total
            if last or now - self._last_line >= self.every_s:
                self._last_line = now
                self.log(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
