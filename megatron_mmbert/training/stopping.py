"""Stopping a run cleanly: SIGTERM/SIGUSR1 (Slurm preemption), a dying torchrun, agreement over ranks.

The loop checks :class:`StopFlag` (and the time limit) through :func:`any_rank` at the end of every
step, so all ranks save the same checkpoint and exit 0 together.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch


class StopFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop checks it (all-reduced) at the end of every step.

    Under torchrun the worker also asks the kernel for SIGTERM when the agent dies
    (``PR_SET_PDEATHSIG``): a SIGKILLed torchrun leaves no orphaned trainers, and they save first."""

    def __init__(self, enabled: bool):
        self.signal: Optional[int] = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)
        if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux"):
            import ctypes

            agent = os.getppid()
            try:  # PR_SET_PDEATHSIG
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM if enabled else signal.SIGKILL)
            except (OSError, AttributeError):
                return
            if os.getppid() != agent:  # the agent died before the request took effect
                self._handle(signal.SIGTERM, None) if enabled else os._exit(1)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.signal = signum


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` is set on any rank (one all-reduce): every rank takes the same branch."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


__all__ = ["StopFlag", "any_rank"]
