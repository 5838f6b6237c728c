"""How far a run is: counters the workers add to, and the progress line the main process prints from
them (the project's one format, :class:`megatron_mmbert.progress.Progress`).

The line, every ``log_interval_s`` seconds on stderr: units done, the share of the pending input bytes
read (the ETA follows from it), then documents, text bytes and tokens, each with its rate::

    [preprocess] 3/10 units: 45.0% (1.2M/2.7M input bytes), 1.1M input bytes/s, 1.2k docs (300/s),
    2.5M text bytes (1.1M/s), 5.0k tokens (2.0k/s), elapsed 0:00:04, ETA 0:00:05
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from typing import Dict, Optional, TextIO

from megatron_mmbert.progress import Progress


class Counters:
    """docs / text bytes / tokens / on-disk bytes done, shared by worker processes (a shared array of
    ``ctx``, the pool's multiprocessing context)."""

    FIELDS = ("docs", "text_bytes", "tokens", "disk_bytes")

    def __init__(self, ctx=None) -> None:
        self._arr = (ctx or mp).Array("d", len(self.FIELDS))

    def add(self, **values) -> None:
        with self._arr.get_lock():
            for k, v in values.items():
                self._arr[self.FIELDS.index(k)] += v

    def snapshot(self) -> Dict[str, float]:
        with self._arr.get_lock():
            return dict(zip(self.FIELDS, self._arr[:]))


class InlineCounters(Counters):
    """Counters for a run inside this process (workers=1): prints progress as it counts."""

    def __init__(self, progress: "RunProgress") -> None:
        self._values = dict.fromkeys(self.FIELDS, 0.0)
        self._progress = progress

    def add(self, **values) -> None:
        for k, v in values.items():
            self._values[k] += v
        self._progress.maybe_print(self)

    def snapshot(self) -> Dict[str, float]:
        return dict(self._values)


class RunProgress:
    """The run's progress line (see the module docstring), at most one every ``interval`` seconds."""

    def __init__(self, total_disk_bytes: int, total_units: int, interval: float,
                 stream: Optional[TextIO] = sys.stderr) -> None:
        self.units_total = total_units
        self.units_done = 0
        self.interval = interval
        self._line = Progress("preprocess", total_disk_bytes, "input bytes", stream, every_s=interval)

    def maybe_print(self, counters: Counters, force: bool = False) -> None:
        """Print the line if it is due (or ``force``), from the counters as they are now."""
        if not (force or self._line.due()):
            return
        c = counters.snapshot()
        self._line.update(c["disk_bytes"], f"{self.units_done}/{self.units_total} units", force=True,
                          counts={"docs": c["docs"], "text bytes": c["text_bytes"], "tokens": c["tokens"]})
