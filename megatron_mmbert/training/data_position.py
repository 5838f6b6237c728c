"""Where a run stands in its data, and whether a branch continues its parent's data.

Every training checkpoint records, beside the :class:`~megatron_mmbert.training.state.TrainState`,
the position of the data it was saved at: ``train_state.data_position`` in its ``mmbert_config.json``,
a :class:`DataPosition`. A language's documents are one stream across the phases (a phase takes the
next tokens of it, data/index/), so the record names the phase and the samples consumed in it, the
data seed and manifest digests that make the streams, and where every language's stream stands at
the end of that phase. Two readers:

* the branch check (:func:`check_branch`): a run from ``init.checkpoint`` at ``init.start_phase``
  must start every stream exactly where the checkpoint's phase ended it, with the same data seed and
  manifests, so a decay branch reads the rows its parent's decay reads (tests/test_branch_data.py);
  ``init.restart_data`` accepts a different start on purpose;
* the resume check (:mod:`~megatron_mmbert.training.resume_check`): the manifests against the digests
  the checkpoint recorded, and whether it ends its phase.

The record is JSON, written by :meth:`DataPosition.to_dict` with the keys, order and values of every
earlier version, and read by :meth:`DataPosition.from_dict`, which names the checkpoint when a record
is malformed. The index plan (``index_plan.json``, read typed as ``data.index.IndexPlan``) is read in one place,
:func:`_plan_phase`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from megatron_mmbert.checkpoints.layout import CheckpointError, config_path, read_config
from megatron_mmbert.config_base import ConfigError

if TYPE_CHECKING:
    from megatron_mmbert.data.index import IndexPlan

BRANCH_FIX = ("declare the parent's phase list (inherit the parent's config, editing phases by name) and "
              "set init.start_phase to the phase after the checkpoint's; or set init.restart_data: true "
              "to start from this run's own plan on purpose")
"""How to make a refused branch continue its parent's data (or accept that it does not)."""


@dataclass(frozen=True)
class DataPosition:
    """The data position a checkpoint records (``train_state.data_position``)."""

    phase: str
    """Name of the phase the checkpoint was saved in."""
    consumed_samples: int
    """Samples (rows) of that phase consumed."""
    phase_samples: int
    """Samples of that phase in the run's plan."""
    at_phase_end: bool
    """Every sample of the phase consumed: a ``phase_end_*`` checkpoint, one a branch may start from."""
    data_seed: int
    """The data seed: samples, masks and every language's epoch shuffle are functions of it."""
    manifest_sha256: str
    """Content digest of the run's ``data.manifest``."""
    sources_sha256: Dict[str, str] = field(default_factory=dict)
    """Source id -> content digest of each phase manifest (``phases[].manifest``) the plan read; absent
    from records written before phases had their own manifests, read as none."""
    stream_positions: Dict[str, int] = field(default_factory=dict)
    """Language stream -> its token position at the END of ``phase`` (also in a checkpoint saved
    before the phase's end: the position a branch from that phase's end would start at); streams
    still at token 0 are left out."""

    def to_dict(self) -> Dict[str, Any]:
        """The JSON record, keys in the order every version wrote them."""
        return {
            "phase": self.phase, "consumed_samples": self.consumed_samples, "phase_samples": self.phase_samples,
            "at_phase_end": self.at_phase_end, "data_seed": self.data_seed,
            "manifest_sha256": self.manifest_sha256,
            "sources_sha256": self.sources_sha256,  # phase manifests (per-source streams)
            "stream_positions": self.stream_positions,  # at the end of the phase
        }

    @classmethod
    def from_dict(cls, record: Any, checkpoint: str) -> "DataPosition":
        """The position of a checkpoint's record; a :class:`CheckpointError` naming the checkpoint's
        config file and the field when the record is not one (edited or damaged)."""
        where = f"{config_path(checkpoint)}: train_state.data_position"

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{where} {what}; the checkpoint is damaged or was edited: restore the file "
                                   "from a copy or use another checkpoint (a branch may also set "
                                   "init.restart_data: true, which does not read the record)")

        if not isinstance(record, dict):
            raise bad(f"is a {type(record).__name__}, not a mapping")
        values = {}
        for name, kind in _FIELD_TYPES.items():
            if name not in record:
                if name == "sources_sha256":
                    continue  # records before per-phase manifests
                raise bad(f"lacks {name!r}")
            value = record[name]
            if not _is_a(value, kind):
                raise bad(f"field {name!r} is {value!r}, not {_KIND_NAMES[kind]}")
            values[name] = value
        return cls(**values)

    @classmethod
    def of_train_state(cls, train_state: Any, checkpoint: str) -> Optional["DataPosition"]:
        """The position a checkpoint's ``train_state`` records; None when it records none (an imported
        checkpoint, or one saved before checkpoints recorded it)."""
        if train_state is None:
            return None
        if not isinstance(train_state, dict):
            raise CheckpointError(f"{config_path(checkpoint)}: train_state is a {type(train_state).__name__}, "
                                  "not a mapping; the checkpoint is damaged or was edited")
        record = train_state.get("data_position")
        return cls.from_dict(record, checkpoint) if record else None

    @classmethod
    def of_checkpoint(cls, checkpoint: str) -> Optional["DataPosition"]:
        """The position recorded in ``checkpoint``'s ``mmbert_config.json`` (None: it records none)."""
        return cls.of_train_state(read_config(checkpoint).get("train_state"), checkpoint)


_STR, _INT, _BOOL, _DIGESTS, _POSITIONS = "str", "int", "bool", "digests", "positions"
_FIELD_TYPES = {"phase": _STR, "consumed_samples": _INT, "phase_samples": _INT, "at_phase_end": _BOOL,
                "data_seed": _INT, "manifest_sha256": _STR, "sources_sha256": _DIGESTS,
                "stream_positions": _POSITIONS}
_KIND_NAMES = {_STR: "a string", _INT: "an integer", _BOOL: "true or false",
               _DIGESTS: "a mapping of source ids to digests", _POSITIONS: "a mapping of languages to token counts"}


def _is_a(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return False
    if kind == _DIGESTS:
        return all(isinstance(v, str) for v in value.values())
    return all(_is_a(v, _INT) and v >= 0 for v in value.values())


# -- the index plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedPhase:
    """What the data position needs of one phase of an index plan."""

    name: str
    samples: int
    """Samples (rows) of the phase."""
    first_tokens: Dict[str, int]
    """Language stream -> its token position at the phase's start (every language of the phase)."""
    end_tokens: Dict[str, int]
    """Language stream -> its token position at the phase's end."""
    data_seed: int
    manifest_sha256: str
    sources_sha256: Dict[str, str]


def _plan_phase(plan: "IndexPlan", index: int) -> PlannedPhase:
    """Phase ``index`` of the run's typed index plan (``data.index.IndexPlan``, read from
    ``index_plan.json``): the one place this module reads the plan."""
    phase = plan.phases[index]
    return PlannedPhase(
        name=phase.name, samples=phase.samples, first_tokens=phase.first_tokens(),
        end_tokens=plan.phase_end_positions(phase.name), data_seed=plan.seed,
        manifest_sha256=plan.manifest_sha256, sources_sha256=dict(plan.sources_sha256 or {}),
    )


def position_in_plan(plan: "IndexPlan", phase_index: int, consumed_samples: int) -> DataPosition:
    """The position after ``consumed_samples`` samples of phase ``phase_index`` of the run's index plan:
    what a checkpoint saved there records."""
    p = _plan_phase(plan, phase_index)
    return DataPosition(
        phase=p.name, consumed_samples=int(consumed_samples), phase_samples=p.samples,
        at_phase_end=consumed_samples >= p.samples, data_seed=p.data_seed, manifest_sha256=p.manifest_sha256,
        sources_sha256=p.sources_sha256, stream_positions={lang: t for lang, t in p.end_tokens.items() if t},
    )


# -- the branch check -------------------------------------------------------------------------------

def check_branch(parent: Optional[DataPosition], cfg, plan: "IndexPlan") -> Optional[str]:
    """Refuse (``ConfigError``) a run from ``init.checkpoint`` whose data would not continue the
    checkpoint's: its start phase (``cfg.start_phase_index`` of the run's index ``plan``) must begin
    where ``parent``'s phase ended every stream, with the same data seed and manifests. A checkpoint
    recording no position (``parent`` None: imported, or not from a training run) can only start the
    run's first phase; ``init.restart_data`` accepts the mismatch on purpose. Returns the line to log
    (None: nothing to say)."""
    start = _plan_phase(plan, cfg.start_phase_index)
    checkpoint = cfg.init.checkpoint
    if cfg.init.restart_data:
        return f"init.restart_data: the data starts from this run's own plan, not checked against {checkpoint}"
    if parent is None:
        if cfg.start_phase_index > 0:
            raise ConfigError(
                f"init.checkpoint={checkpoint!r} records no data position (imported, or saved by an "
                f"older version), so starting at phase {start.name!r} cannot be checked to continue its "
                f"data; branch from a phase_end_* checkpoint of a training run, or {BRANCH_FIX}"
            )
        return None
    if not parent.at_phase_end:
        raise ConfigError(
            f"init.checkpoint={checkpoint!r} was saved {parent.consumed_samples} of "
            f"{parent.phase_samples} samples into phase {parent.phase!r}; branch from a phase end "
            f"(RUN/checkpoints/phase_end_{parent.phase}), or resume that run instead"
        )
    problems = branch_differences(parent, start)
    if problems:
        raise ConfigError(
            f"this run's phase {start.name!r} does not continue the data of init.checkpoint="
            f"{checkpoint!r}: " + "; ".join(problems) + f". To branch, {BRANCH_FIX}"
        )
    return (f"branch check: phase {start.name!r} continues {checkpoint}'s data "
            f"(phase {parent.phase!r} end, {len(start.first_tokens)} language streams)")


def branch_differences(parent: DataPosition, start: PlannedPhase) -> List[str]:
    """Why a run's start phase would not continue ``parent``'s data, one phrase a reason (empty: it does)."""
    problems = []
    if parent.data_seed != start.data_seed:
        problems.append(f"data seed {start.data_seed} vs the checkpoint's {parent.data_seed}")
    if parent.manifest_sha256 != start.manifest_sha256:
        problems.append("the manifest differs from the checkpoint's (other shards or token counts)")
    # Phase manifests the parent's streams used: their content is part of the stream names too.
    for sid, digest in parent.sources_sha256.items():
        if start.sources_sha256.get(sid) not in (None, digest):
            problems.append(f"phase manifest source {sid!r} differs from the checkpoint's")
    mine, theirs = start.first_tokens, parent.stream_positions
    differ = sorted(lang for lang in set(mine) | set(theirs) if mine.get(lang, 0) != theirs.get(lang, 0))
    if differ:
        shown = ", ".join(f"{lang} {mine.get(lang, 0):,} vs {theirs.get(lang, 0):,}" for lang in differ[:3])
        problems.append(f"{len(differ)} language stream(s) would start elsewhere than the checkpoint's "
                        f"phase {parent.phase!r} ended (this run vs checkpoint, tokens: {shown})")
    return problems


__all__ = ["DataPosition", "PlannedPhase", "position_in_plan", "check_branch", "branch_differences", "BRANCH_FIX"]
