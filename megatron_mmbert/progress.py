"""Progress of long work -- preprocessing, index builds, merging, evaluation, training -- in one
format: how far (done / total, %), how fast (a rate per second with k/M/B suffixes) and how long
still (an ETA as ``H:MM:SS``), at most one line every few seconds.

Every tool's progress goes through here (:class:`Progress` for a line on stderr; the trainer's log
line uses :func:`format_eta` and :func:`human`), so a user reads the same numbers the same way in
every stage. Imports nothing of the package.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Optional, TextIO


def format_eta(seconds: Optional[float]) -> str:
    """``H:MM:SS`` (``n/a`` when unknown: no rate yet, nothing left to measure)."""
    if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "n/a"
    return str(datetime.timedelta(seconds=int(seconds)))


def human(x: float) -> str:
    """A count or rate with a k / M / B / T suffix and one decimal (``1.2M``); below 10, a fraction
    keeps its decimal (``0.4``)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.1f}" if abs(x) < 10 and x != int(x) else f"{x:.0f}"


class Progress:
    """``[label] what: 41.7% (5/12 languages), 0.8 languages/s, elapsed 0:00:06, ETA 0:00:08`` on
    ``stream`` (None: silent), at most every ``every_s`` seconds and always at the end."""

    def __init__(self, label: str, total: int, unit: str, stream: Optional[TextIO] = sys.stderr,
                 every_s: float = 2.0):
        self.label, self.unit, self.stream, self.every_s = label, unit, stream, every_s
        self.total = max(int(total), 1)
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start

    def eta_s(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left at the rate so far (None before any progress)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        if self.done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def line(self, what: str = "", now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        head = f"[{self.label}] {what + ': ' if what else ''}"
        return (f"{head}{100.0 * self.done / self.total:5.1f}% ({human(self.done)}/{human(self.total)} {self.unit}), "
                f"{human(self.done / elapsed)} {self.unit}/s, elapsed {format_eta(elapsed)}, "
                f"ETA {format_eta(self.eta_s(now))}")

    def advance(self, n: int, what: str = "", force: bool = False) -> None:
        """Count ``n`` more done; print a line when ``every_s`` has passed, at the end, or ``force``."""
        self.done += n
        now = time.monotonic()
        if self.stream is None:
            return
        if force or now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self.stream.write(self.line(what, now) + "\n")
            self.stream.flush()


__all__ = ["Progress", "format_eta", "human"]
