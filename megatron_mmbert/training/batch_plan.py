"""Rows per optimizer step: the one place for the global batch, the batch-size warmup and the
number of steps a phase takes.

A step that starts ``consumed`` samples into a phase takes :meth:`BatchPlan.step_rows` rows: the
phase's global batch, or during the batch-size warmup (``batch.rampup_*``, counted in the ramped
phase's tokens) the current warmup size, and never more than the samples the phase has left.
"""

from __future__ import annotations

import bisect
from typing import List

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.training.config import RunConfig


class BatchPlan:
    """Batch arithmetic of one run config (pure: the same answers on every rank and on resume)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rampup_rows: List[int] = rampup_rows(cfg)
        self.rampup_token_thresholds: List[int] = rampup_token_thresholds(cfg)
        self.rampup_phase: str = cfg.batch.rampup_phase or cfg.phases[0].name

    def step_rows(self, phase: PhaseConfig, consumed: int, num_samples: int) -> int:
        """Rows of the step that starts at ``consumed`` samples into ``phase`` (batch-size warmup aware)."""
        rows = self.cfg.phase_global_batch(phase)
        tokens = consumed * phase.seq_len
        if phase.name == self.rampup_phase and tokens < self.cfg.batch.rampup_tokens and self.rampup_rows:
            k = bisect.bisect_right(self.rampup_token_thresholds, tokens)
            if k < len(self.rampup_rows):
                rows = self.rampup_rows[k]
        return min(rows, num_samples - consumed)

    def phase_steps(self, phase: PhaseConfig, num_samples: int, consumed: int = 0) -> int:
        """Optimizer steps from ``consumed`` to the end of the phase."""
        steps = 0
        while consumed < num_samples:
            consumed += self.step_rows(phase, consumed, num_samples)
            steps += 1
        return steps


def rampup_rows(cfg: RunConfig) -> List[int]:
    """The batch sizes of the batch-size warmup, in order (empty without warmup)."""
    b = cfg.batch
    if b.rampup_start_rows is None or b.rampup_tokens <= 0:
        return []
    phase = cfg.phase(b.rampup_phase) if b.rampup_phase else cfg.phases[0]
    full = cfg.phase_global_batch(phase)
    inc = b.rampup_increment_rows or b.rampup_start_rows
    return list(range(b.rampup_start_rows, full, inc))


def rampup_token_thresholds(cfg: RunConfig) -> List[int]:
    """For each size of :func:`rampup_rows`, the phase token count up to which it is used.

    The shape of ModernBERT/mmBERT's ``BatchSizeWarmupScheduler`` (``_calculate_step_thresholds``):
    the threshold of size ``i`` is ``ceil(rampup_tokens x (rows_0 + ... + rows_i) / sum(rows))``,
    i.e. proportional to the cumulative batch size, so every size gets the same number of steps (a
    size of ``r`` rows holds for ``rampup_tokens x r / sum(rows)`` tokens = ``r`` x that many rows).
    A step uses the first size whose threshold exceeds the tokens consumed before it; from
    ``rampup_tokens`` on, the full batch. Exact integer arithmetic (the reference rounds a float).
    """
    sizes = rampup_rows(cfg)
    total, cum, out = sum(sizes), 0, []
    for rows in sizes:
        cum += rows
        out.append(-(-cfg.batch.rampup_tokens * cum // total))
    return out


def step_rows(cfg: RunConfig, phase: PhaseConfig, consumed: int, num_samples: int) -> int:
    """:meth:`BatchPlan.step_rows` of ``cfg`` (one-off callers and tests)."""
    return BatchPlan(cfg).step_rows(phase, consumed, num_samples)


def phase_steps(cfg: RunConfig, phase: PhaseConfig, num_samples: int, consumed: int = 0) -> int:
    """:meth:`BatchPlan.phase_steps` of ``cfg`` (one-off callers and tests)."""
    return BatchPlan(cfg).phase_steps(phase, num_samples, consumed)


__all__ = ["BatchPlan", "rampup_rows", "rampup_token_thresholds", "step_rows", "phase_steps"]
