"""``profiling:`` -- the PyTorch profiler around chosen optimizer steps and a CUDA memory snapshot,
written under ``{run_dir}/profile/`` (docs/training.md "Profiling").

A trace is one step of one rank, as torchtitan and Megatron-LM's ``--profile-step-start/end`` take
them: ``torch.profiler`` with CPU (and CUDA) activities, input shapes and memory, exported as a
Chrome/Perfetto trace ``step_{N}-rank{R}.json`` (written to a temporary name, then renamed). The
memory snapshot is the CUDA caching allocator's history (``torch.cuda.memory._record_memory_history``)
from the first profiled step to the end of the last, dumped as ``memory_snapshot-rank{R}.pickle``
for https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

from megatron_mmbert.fileio import atomic_write_with
from megatron_mmbert.training.config import ProfilingSection

PROFILE_DIR = "profile"
"""The folder under the run directory that holds the traces and snapshots."""


class StepProfiler:
    """Wraps optimizer steps: :meth:`step` is a context manager that profiles the steps named in
    ``profiling.steps`` and records the memory history around them."""

    def __init__(self, section: ProfilingSection, run_dir: str, rank: int, device: torch.device,
                 log: Callable[[str], None] = print):
        self.steps = sorted(set(section.steps))
        self.dir = os.path.join(run_dir, PROFILE_DIR)
        self.rank = rank
        self.log = log
        self.snapshot = section.memory_snapshot and device.type == "cuda"
        if section.memory_snapshot and not self.snapshot:
            log("profiling.memory_snapshot: a CUDA allocator snapshot needs a GPU; none taken on this machine")
        self.first = self.steps[0] if self.steps else 1
        self.last = self.steps[-1] if self.steps else 1
        self.written = []
        """Paths written so far."""

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """Run optimizer step ``number`` (1-based) inside this block."""
        if self.snapshot and number == self.first:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        try:
            if number in self.steps:
                with self._profile(number):
                    yield
            else:
                yield
        finally:
            if self.snapshot and number == self.last:
                path = os.path.join(self.dir, f"memory_snapshot-rank{self.rank}.pickle")
                atomic_write_with(path, torch.cuda.memory._dump_snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)
                self._wrote(path)

    @contextlib.contextmanager
    def _profile(self, number: int):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False) as prof:
            yield
        path = os.path.join(self.dir, f"step_{number}-rank{self.rank}.json")
        atomic_write_with(path, prof.export_chrome_trace)
        self._wrote(path)

    def _wrote(self, path: str) -> None:
        self.written.append(path)
        self.log(f"profiling: wrote {path}")


__all__ = ["PROFILE_DIR", "StepProfiler"]
