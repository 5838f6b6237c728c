"""What every benchmark script shares: the machine line, appending a section to RESULTS.md, the
CPU's peak memory (``PeakRSS``)."""

from __future__ import annotations

import os
import platform

RESULTS = os.environ.get("MMBERT_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
"""Where ``--append`` writes: benchmarks/RESULTS.md, or ``$MMBERT_RESULTS`` (gpu_check.sh's output folder)."""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: str = "cpu") -> str:
    """``<GPU name>`` on CUDA, else ``<CPU model>, <n> cores``, plus the load average (shared boxes)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{cpu_model()}, {os.cpu_count()} cores{load}"


def append_results(section: str) -> None:
    """Append a Markdown section (it should start with a `## title (date)` line) to RESULTS.md."""
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(section.rstrip() + "\n")


def report(lines, append: bool) -> None:
    """Print a result section (a list of Markdown lines) and, with ``append``, add it to RESULTS.md."""
    text = "\n".join(lines)
    print(text)
    if append:
        append_results(text)


class PeakRSS:
    """On CPU, where no allocator reports a peak: the process's resident memory sampled every
    millisecond from /proc/self/statm while the block runs, as bytes above its value at the start
    (large CPU tensors are mmap'ed and returned on free, so this follows the live tensors)."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.start
