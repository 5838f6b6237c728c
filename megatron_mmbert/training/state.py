"""Where a training run is: the typed state a checkpoint records and a resumed run continues from.

The data position of a phase is one integer (``consumed_samples``; a sample is a pure function of
(data seed, global sample index)) and the LR schedule a function of the phase's consumed tokens, so
this small record, plus the model and optimizer, is all a resumed run needs to take the same steps
as an uninterrupted one. Dropout needs nothing: it is re-seeded from (seed, step) every step
(:data:`RngRecipe.RESEED_PER_STEP`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class RngRecipe(str, enum.Enum):
    """How the run's random state is made, as recorded in checkpoints."""

    RESEED_PER_STEP = "reseed_per_step"
    """Dropout re-seeded from (seed, step, pipeline rank) every step (``loop.reseed``): nothing to restore."""


@dataclass
class TrainState:
    """Position of a run: phase, samples and tokens consumed, steps taken."""

    phase_index: int
    """Index (into the config's phases) of the phase being trained."""
    first_phase_index: Optional[int] = None
    """The phase this run started at (progress and ETA count from it); None until the run starts."""
    step: int = 0
    """Optimizer steps taken by the run (all phases)."""
    tokens: int = 0
    """Tokens of row capacity trained on (all phases): steps x rows x seq_len."""
    consumed_samples: int = 0
    """Samples (rows) consumed in the current phase: the phase's data position."""
    consumed_samples_per_phase: Dict[str, int] = field(default_factory=dict)
    """Samples consumed per phase name (phases already finished keep their final count)."""
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite loss or gradient, ``train.nan_policy: skip``)."""

    def advance(self, phase: str, rows: int, step_tokens: int) -> None:
        """Account one optimizer step of ``rows`` rows (``step_tokens`` tokens) in ``phase``."""
        self.step += 1
        self.tokens += step_tokens
        self.consumed_samples += rows
        self.consumed_samples_per_phase[phase] = self.consumed_samples

    def start_phase(self, index: int) -> None:
        """Move to phase ``index`` (from its first sample unless it is the phase being resumed)."""
        if index != self.phase_index:
            self.phase_index, self.consumed_samples = index, 0

    def to_checkpoint(self, phase: str, scheduler: Dict[str, Any], seed: int, data_seed: int,
                      data_position: Dict[str, Any], phase_samples: Optional[int] = None) -> Dict[str, Any]:
        """The ``train_state`` a checkpoint records (JSON-able; :meth:`from_checkpoint` reads it).
        ``phase_samples``: the rows of ``phase``, so the record alone says whether it ends the phase."""
        return {
            "phase_index": self.phase_index, "first_phase_index": self.first_phase_index, "step": self.step,
            "tokens": self.tokens, "consumed_samples": self.consumed_samples, "phase_samples": phase_samples,
            "consumed_samples_per_phase": dict(self.consumed_samples_per_phase),
            "skipped_steps": self.skipped_steps, "phase": phase, "scheduler": scheduler, "seed": seed,
            "data_seed": data_seed, "rng": RngRecipe.RESEED_PER_STEP.value, "data_position": data_position,
        }

    @classmethod
    def from_checkpoint(cls, record: Dict[str, Any], phase_names: List[str]) -> "TrainState":
        """The state of a checkpoint's ``train_state``, positioned in this config's phase list (by the
        phase's name). Older checkpoints (no ``first_phase_index``, ``rng`` in prose) load too."""
        return cls(
            phase_index=phase_names.index(record["phase"]),
            first_phase_index=record.get("first_phase_index"),
            step=int(record["step"]),
            tokens=int(record["tokens"]),
            consumed_samples=int(record["consumed_samples"]),
            consumed_samples_per_phase={k: int(v) for k, v in record.get("consumed_samples_per_phase", {}).items()},
            skipped_steps=int(record.get("skipped_steps", 0)),
        )


__all__ = ["TrainState", "RngRecipe"]


def phase_complete(record: Dict[str, Any], phase_samples: Optional[int] = None) -> bool:
    """Whether a checkpoint's ``train_state`` ends its phase: every row of the phase consumed.
    ``phase_samples`` (the rows of the phase, from the data stream) defaults to the record's own."""
    total = record.get("phase_samples") if phase_samples is None else phase_samples
    return total is not None and int(record["consumed_samples"]) >= int(total)


def run_complete(record: Dict[str, Any], phase_names: List[str], phase_samples: Optional[int] = None) -> bool:
    """Whether a checkpoint's ``train_state`` ends the run: it ends the last of ``phase_names``. The one
    definition of a finished run: the trainer's resume and ``mmbert-pretrain --is-complete`` ask it."""
    return record.get("phase") == phase_names[-1] and phase_complete(record, phase_samples)
