"""What every benchmark script shares: the machine line and appending a section to RESULTS.md."""

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
