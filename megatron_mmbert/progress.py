"""Progress of long work -- preprocessing, index builds, merging, evaluation, training -- in one
format: how far (done / total, %), how fast (a rate per second with k/M/B suffixes) and how long
still (an ETA as ``H:MM:SS``), at most one line every few seconds.

Every tool's progress goes through here (:class:`Progress` for a line on stderr; the trainer's log
line uses :func:`format_eta` and :func:`human`), so a user reads the same numbers the same way in
every stage. Work measured in one unit while other things are counted beside it (preprocessing: input
bytes, with documents, text bytes and tokens) gives those as ``counts`` (each shown with its rate).
Imports nothing of the package.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Dict, Optional, TextIO


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
    ``stream`` (None: silent), at most every ``every_s`` seconds and always once at the end."""

    def __init__(self, label: str, total: int, unit: str, stream: Optional[TextIO] = sys.stderr,
                 every_s: float = 2.0):
        self.label, self.unit, self.stream, self.every_s = label, unit, stream, every_s
        self.total = max(int(total), 1)
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start
        self._ended = False

    def eta_s(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left at the rate so far (None before any progress)."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        if self.done <= 0 or elapsed <= 0:
            return None
        return max(self.total - self.done, 0) * elapsed / self.done

    def line(self, what: str = "", now: Optional[float] = None, counts: Optional[Dict[str, float]] = None) -> str:
        """The progress line; ``counts`` (name -> running total) adds ``1.2k docs (300/s)`` for each."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        head = f"[{self.label}] {what + ': ' if what else ''}"
        extra = "".join(f"{human(n)} {name} ({human(n / elapsed)}/s), " for name, n in (counts or {}).items())
        return (f"{head}{100.0 * min(self.done / self.total, 1.0):5.1f}% ({human(self.done)}/{human(self.total)} "
                f"{self.unit}), {human(self.done / elapsed)} {self.unit}/s, {extra}elapsed {format_eta(elapsed)}, "
                f"ETA {format_eta(self.eta_s(now))}")

    def due(self, now: Optional[float] = None) -> bool:
        """Whether :meth:`update` would print now: ``every_s`` has passed since the last line."""
        return (time.monotonic() if now is None else now) - self._last >= self.every_s

    def update(self, done: float, what: str = "", force: bool = False,
               counts: Optional[Dict[str, float]] = None) -> None:
        """Set the amount done to ``done`` (a running total, e.g. read from counters that workers share);
        print a line when ``every_s`` has passed, the first time ``total`` is reached, or ``force``."""
        self.done = done
        now = time.monotonic()
        if self.stream is None:
            return
        end = self.done >= self.total and not self._ended
        if force or end or self.due(now):
            self._ended = self._ended or end
            self._last = now
            self.stream.write(self.line(what, now, counts) + "\n")
            self.stream.flush()

    def advance(self, n: int, what: str = "", force: bool = False) -> None:
        """Count ``n`` more done; print a line when ``every_s`` has passed, at the end, or ``force``."""
        self.update(self.done + n, what, force)


__all__ = ["Progress", "format_eta", "human"]
