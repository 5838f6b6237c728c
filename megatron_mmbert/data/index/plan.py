"""The index plan, ``index_plan.json``: what the index holds per phase and language, as JSON and typed.

The writer: :func:`index_plan` makes the JSON object from a built schedule (:func:`stream_positions`,
:func:`packing_summary`), :func:`write_index_plan` writes it atomically into the index folder (sorted
keys, indent 1). The reader: :class:`IndexPlan` (per phase a :class:`PlanPhase`, its
:class:`PackingSummary` and per language a :class:`LanguagePhase`), built by
:meth:`IndexPlan.from_json` / :meth:`IndexPlan.read` with an :class:`IndexPlanError` naming the file
and the field when the JSON is not a plan; :meth:`IndexPlan.to_json` gives back the very object it was
read from, so a plan read and written again has the same bytes.

The fields (see also the package docstring, "The plan"): per phase its ``samples``, ``packing`` (mode
and, over the built rows, ``pad_fraction``, ``fragment_token_fraction``: tokens in pieces that are not
a whole document, ``bos_start_fraction``: segments starting with ``<bos>``) and, per language,
``rows``, ``tokens`` (stream tokens the phase consumed: ``rows x seq_len`` for concat, the documents
taken for best_fit), ``first_token`` (the language's stream position where the phase starts) and
``epochs`` (passes over the language's tokens by the end of the phase, cumulative over the schedule).
Training checkpoints carry a phase's end positions (:meth:`IndexPlan.phase_end_positions`) so a branch
can be checked against its parent.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from megatron_mmbert.data.index.digests import INDEX_VERSION, source_digests
from megatron_mmbert.data.index.packing import PACKING_MODES, PACKING_STATS
from megatron_mmbert.data.schedule import PhasePlan
from megatron_mmbert.fileio import atomic_write_json

PLAN_FILE = "index_plan.json"
"""The plan's file name inside the index folder."""


class IndexPlanError(ValueError):
    """A file or object that is not an index plan; the message names the file and the field."""


# -- reading: typed fields with a clear error -------------------------------------------------------

def _field(obj: Dict, key: str, kind: str, where: str, source: str, optional: bool = False) -> Any:
    """``obj[key]`` checked to be ``kind`` (``int``, ``float``, ``str``, ``bool``, ``dict``, ``list``;
    ``?`` after it: or null)."""
    nullable = kind.endswith("?")
    kind = kind.rstrip("?")
    if key not in obj:
        if optional:
            return None
        raise IndexPlanError(f"{source}: {where}{key} is missing; it is not an index plan "
                             "(written by tools/build_data_index.py or a run, as index_plan.json)")
    value = obj[key]
    if value is None and nullable:
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool),
          "dict": isinstance(value, dict), "list": isinstance(value, list)}[kind]
    if not ok:
        raise IndexPlanError(f"{source}: {where}{key} must be {'null or ' if nullable else ''}{kind}, "
                             f"got {type(value).__name__} {str(value)[:60]!r}")
    return float(value) if kind == "float" else value


def _only(obj: Any, keys: Sequence[str], where: str, source: str) -> Dict:
    """``obj`` checked to be an object holding no key but ``keys``."""
    if not isinstance(obj, dict):
        raise IndexPlanError(f"{source}: {where.rstrip('.') or 'the file'} must be a JSON object, "
                             f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        raise IndexPlanError(f"{source}: {where}{unknown[0]} is not a field of an index plan "
                             f"(fields there: {', '.join(keys)})")
    return obj


@dataclasses.dataclass(frozen=True)
class LanguagePhase:
    """One language in one phase (``phases[k].languages[lang]``)."""

    rows: int
    """Rows (samples of ``seq_len`` tokens) drawn from the language in the phase."""
    tokens: int
    """Stream tokens the phase consumed (concat: ``rows x seq_len``; best_fit: the documents taken)."""
    first_token: int
    """The language's stream position (tokens) where the phase starts."""
    epochs: float
    """Passes over the language's tokens by the end of the phase, cumulative over the schedule."""

    FIELDS = ("rows", "tokens", "first_token", "epochs")

    @property
    def end_token(self) -> int:
        """The stream position where the phase ends (the next phase's ``first_token``)."""
        return self.first_token + self.tokens

    @classmethod
    def from_json(cls, obj: Any, where: str, source: str) -> "LanguagePhase":
        _only(obj, cls.FIELDS, where, source)
        return cls(*(_field(obj, k, kind, where, source) for k, kind in zip(cls.FIELDS, ("int", "int", "int", "float"))))

    def to_json(self) -> Dict:
        return {"rows": self.rows, "tokens": self.tokens, "first_token": self.first_token, "epochs": self.epochs}


@dataclasses.dataclass(frozen=True)
class PackingSummary:
    """A phase's ``packing`` entry (:func:`packing_summary`): the fractions are None for a phase not
    built (before the start phase) or without rows."""

    mode: str
    """``concat`` or ``best_fit``."""
    pad_fraction: Optional[float]
    """Padding tokens over row tokens."""
    fragment_token_fraction: Optional[float]
    """Tokens in pieces that are not a whole document, over the non-padding tokens."""
    bos_start_fraction: Optional[float]
    """Segments that start with ``<bos>``."""
    segments: Optional[int] = None
    """Segments (pieces) in the phase's rows (built phases only)."""
    eos_end_fraction: Optional[float] = None
    """best_fit: segments that end with ``<eos>``."""
    dropped_tokens: Optional[int] = None
    """best_fit, built phases: tokens dropped (short non-first pieces, pieces still pending at the end)."""
    rows_per_packed_row: Optional[int] = None
    """best_fit: ``seq_len`` rows per packed row."""
    packed_row_tokens: Optional[int] = None
    """best_fit: tokens per packed row."""

    KINDS = {"mode": "str", "pad_fraction": "float?", "fragment_token_fraction": "float?",
             "bos_start_fraction": "float?", "segments": "int", "eos_end_fraction": "float?",
             "dropped_tokens": "int", "rows_per_packed_row": "int", "packed_row_tokens": "int"}

    @classmethod
    def from_json(cls, obj: Any, where: str, source: str) -> "PackingSummary":
        _only(obj, tuple(cls.KINDS), where, source)
        best_fit = obj.get("mode") == "best_fit"
        always = {"mode", "pad_fraction", "fragment_token_fraction", "bos_start_fraction"}
        if best_fit:
            always |= {"eos_end_fraction", "rows_per_packed_row", "packed_row_tokens"}
        values = {k: _field(obj, k, kind, where, source, optional=k not in always) for k, kind in cls.KINDS.items()}
        if values["mode"] not in PACKING_MODES:
            raise IndexPlanError(f"{source}: {where}mode must be one of {PACKING_MODES}, got {values['mode']!r}")
        for k in ("eos_end_fraction", "dropped_tokens", "rows_per_packed_row", "packed_row_tokens"):
            if not best_fit and k in obj:
                raise IndexPlanError(f"{source}: {where}{k} is a best_fit field, but the mode is {values['mode']!r}")
        return cls(**values)

    def to_json(self) -> Dict:
        best_fit = self.mode == "best_fit"
        out: Dict = {"mode": self.mode}
        if best_fit:
            out["rows_per_packed_row"] = self.rows_per_packed_row
            out["packed_row_tokens"] = self.packed_row_tokens
        out["pad_fraction"] = self.pad_fraction
        out["fragment_token_fraction"] = self.fragment_token_fraction
        out["bos_start_fraction"] = self.bos_start_fraction
        if self.segments is not None:
            out["segments"] = self.segments
        if best_fit:
            out["eos_end_fraction"] = self.eos_end_fraction
            if self.dropped_tokens is not None:
                out["dropped_tokens"] = self.dropped_tokens
        return out


@dataclasses.dataclass(frozen=True)
class PlanPhase:
    """One phase of the plan (``phases[k]``)."""

    name: str
    """The phase's name (``PhaseConfig.name``)."""
    index: int
    """Its place in the schedule (0-based)."""
    built: bool
    """Whether its rows are in the index (False before the index's start phase: planned, not built)."""
    seq_len: int
    """Tokens per row."""
    samples: int
    """Rows of the phase."""
    first_sample: int
    """The schedule-wide number of its first row (sample numbers key the masks)."""
    packing: PackingSummary
    """How its rows were packed, measured over the built rows."""
    languages: Dict[str, LanguagePhase]
    """Per manifest language with tokens (also those with no rows in this phase), manifest order."""

    KINDS = {"name": "str", "index": "int", "built": "bool", "seq_len": "int", "samples": "int",
             "first_sample": "int", "packing": "dict", "languages": "dict"}

    def end_positions(self) -> Dict[str, int]:
        """Each language's stream position at the end of the phase (the next phase's ``first_token``)."""
        return {lang: r.end_token for lang, r in self.languages.items()}

    def first_tokens(self) -> Dict[str, int]:
        """Each language's stream position where the phase starts."""
        return {lang: r.first_token for lang, r in self.languages.items()}

    @classmethod
    def from_json(cls, obj: Any, where: str, source: str) -> "PlanPhase":
        _only(obj, tuple(cls.KINDS), where, source)
        values = {k: _field(obj, k, kind, where, source) for k, kind in cls.KINDS.items()}
        values["packing"] = PackingSummary.from_json(values["packing"], f"{where}packing.", source)
        values["languages"] = {lang: LanguagePhase.from_json(r, f"{where}languages.{lang}.", source)
                               for lang, r in values["languages"].items()}
        return cls(**values)

    def to_json(self) -> Dict:
        return {"name": self.name, "index": self.index, "built": self.built, "seq_len": self.seq_len,
                "samples": self.samples, "first_sample": self.first_sample, "packing": self.packing.to_json(),
                "languages": {lang: r.to_json() for lang, r in self.languages.items()}}


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """``index_plan.json``, typed: what the index of a schedule holds (see the module docstring)."""

    version: int
    """The builder's ``INDEX_VERSION`` when it was written."""
    key: str
    """The cache key of the index ('' when built in memory)."""
    seed: int
    """The data seed (shuffles and masks)."""
    start_phase: str
    """The first phase whose rows are built (a branch's start phase)."""
    packing: str
    """``data.packing`` of the index."""
    manifest_sha256: str
    """Content digest of the run's ``data.manifest``."""
    sources_sha256: Dict[str, str]
    """Content digest of each phase manifest, by source id (empty without phase manifests)."""
    language_tokens: Dict[str, int]
    """Tokens per manifest language with tokens (what ``epochs`` counts passes over)."""
    phases: List[PlanPhase]
    """Every phase of the schedule, in order (built or not)."""

    KINDS = {"version": "int", "key": "str", "seed": "int", "start_phase": "str", "packing": "str",
             "manifest_sha256": "str", "sources_sha256": "dict", "language_tokens": "dict", "phases": "list"}

    def phase(self, name: str) -> PlanPhase:
        """The phase called ``name``; KeyError naming the plan's phases otherwise."""
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"phase {name!r} is not in the index plan ({[p.name for p in self.phases]})")

    def phase_end_positions(self, name: str) -> Dict[str, int]:
        """Each language's stream position at the end of phase ``name`` (the next phase's ``first_token``)."""
        return self.phase(name).end_positions()

    def phase_epochs(self, name: str) -> Dict[str, Dict[str, float]]:
        """Per language drawn in phase ``name``: ``in_phase`` (passes over its tokens within the phase:
        what ``max_epochs_per_language`` caps) and ``cumulative`` (passes by the phase's end)."""
        return {lang: {"in_phase": round(r.tokens / self.language_tokens[lang], 6), "cumulative": r.epochs}
                for lang, r in self.phase(name).languages.items() if r.rows > 0}

    @classmethod
    def from_json(cls, obj: Any, source: str = "the index plan") -> "IndexPlan":
        """The plan from its JSON object; :class:`IndexPlanError` naming ``source`` and the field when
        it is not one (a missing or unknown field, a value of the wrong type, an unknown language)."""
        _only(obj, tuple(cls.KINDS), "", source)
        values = {k: _field(obj, k, kind, "", source) for k, kind in cls.KINDS.items()}
        for key in ("sources_sha256", "language_tokens"):
            kind = "str" if key == "sources_sha256" else "int"
            values[key] = {name: _field(values[key], name, kind, f"{key}.", source) for name in values[key]}
        values["phases"] = [PlanPhase.from_json(p, f"phases.{k}.", source) for k, p in enumerate(values["phases"])]
        for p in values["phases"]:
            stray = sorted(set(p.languages) - set(values["language_tokens"]))
            if stray:
                raise IndexPlanError(f"{source}: phases.{p.index}.languages.{stray[0]} has no language_tokens entry")
        return cls(**values)

    @classmethod
    def read(cls, path: str) -> "IndexPlan":
        """The plan in ``path``: an ``index_plan.json`` or the index folder holding it."""
        if os.path.isdir(path):
            path = os.path.join(path, PLAN_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except ValueError as e:
            raise IndexPlanError(f"{path}: not JSON ({e}); rebuild the index (tools/build_data_index.py)") from None
        return cls.from_json(obj, path)

    def to_json(self) -> Dict:
        """The JSON object this plan was read from (what :func:`index_plan` writes)."""
        return {"version": self.version, "key": self.key, "seed": self.seed, "start_phase": self.start_phase,
                "packing": self.packing, "manifest_sha256": self.manifest_sha256,
                "sources_sha256": dict(self.sources_sha256), "language_tokens": dict(self.language_tokens),
                "phases": [p.to_json() for p in self.phases]}

    def write(self, folder: str) -> str:
        """``folder/index_plan.json`` (:func:`write_index_plan`); returns its path."""
        return write_index_plan(self.to_json(), folder)


def as_index_plan(plan: Union[Dict, IndexPlan]) -> IndexPlan:
    """``plan`` typed (a JSON object is read with :meth:`IndexPlan.from_json`)."""
    return plan if isinstance(plan, IndexPlan) else IndexPlan.from_json(plan)


# -- writing ---------------------------------------------------------------------------------------

def stream_positions(plans: List[PhasePlan], counts: np.ndarray) -> np.ndarray:
    """int64 [phases + 1, L]: each language's stream position (tokens) at the start of every phase
    and, last, at the end of the schedule, from the realised sample ``counts`` [phases, L]."""
    seq = np.array([p.phase.seq_len for p in plans], dtype=np.int64)
    used = np.asarray(counts, dtype=np.int64) * seq[:, None]
    return np.concatenate([np.zeros((1, used.shape[1]), np.int64), np.cumsum(used, axis=0)])


def packing_summary(mode: str, stats: Optional[np.ndarray], bin_rows: int = 1, seq_len: int = 0) -> Dict:
    """A phase's ``packing`` entry of the plan from its ``packing_stats`` [L, 8] (None: not built);
    best_fit adds the packed row's geometry (``rows_per_packed_row`` rows of ``seq_len``,
    ``packed_row_tokens``), ``eos_end_fraction`` and the dropped tokens."""
    out: Dict = {"mode": mode}
    if mode == "best_fit":
        out["rows_per_packed_row"] = int(bin_rows)
        out["packed_row_tokens"] = int(bin_rows) * int(seq_len)
    t = None if stats is None else np.asarray(stats, dtype=np.int64).sum(axis=0)
    if t is None or t[0] == 0:
        out = {**out, "pad_fraction": None, "fragment_token_fraction": None, "bos_start_fraction": None}
        return {**out, "eos_end_fraction": None} if mode == "best_fit" else out
    c = dict(zip(PACKING_STATS, (int(x) for x in t)))
    out["pad_fraction"] = round(c["pad_tokens"] / c["row_tokens"], 6)
    out["fragment_token_fraction"] = round(c["fragment_tokens"] / max(c["row_tokens"] - c["pad_tokens"], 1), 6)
    out["bos_start_fraction"] = round(c["bos_segments"] / max(c["segments"], 1), 6)
    out["segments"] = c["segments"]
    if mode == "best_fit":
        out["eos_end_fraction"] = round(c["eos_segments"] / max(c["segments"], 1), 6)
        out["dropped_tokens"] = c["dropped_short_tokens"] + c["dropped_pending_tokens"]
    return out


def index_plan(manifest, plans: List[PhasePlan], counts: np.ndarray, seed: int, start_phase: int = 0,
               key: str = "", positions: Optional[np.ndarray] = None, packing: str = "concat",
               packing_stats: Optional[Sequence[Optional[np.ndarray]]] = None,
               bin_rows: Optional[Sequence[int]] = None) -> Dict:
    """The index as JSON: per phase its samples, ``packing`` (:func:`packing_summary`) and, per
    manifest language with tokens, ``rows``, ``tokens`` (stream tokens consumed in the phase),
    ``first_token`` (stream position where the phase starts) and ``epochs`` (cumulative passes
    over the language's tokens at the end of the phase). ``positions``: the stream positions
    [phases + 1, L] (default: concat's rows x seq_len)."""
    if positions is None:
        positions = stream_positions(plans, counts)
    positions = np.asarray(positions, dtype=np.int64)
    languages = plans[0].languages
    lang_tokens = plans[0].tokens
    sources = source_digests(manifest)
    phases = []
    first_sample = 0
    for k, plan in enumerate(plans):
        rows = {}
        for i, lang in enumerate(languages):
            if lang_tokens[i] <= 0:
                continue
            n = int(counts[k][i])
            rows[lang] = {
                "rows": n,
                "tokens": int(positions[k + 1, i] - positions[k, i]),
                "first_token": int(positions[k, i]),
                "epochs": round(float(positions[k + 1, i]) / float(lang_tokens[i]), 6),
            }
        phases.append({
            "name": plan.phase.name, "index": k, "built": k >= start_phase, "seq_len": plan.phase.seq_len,
            "samples": plan.num_samples, "first_sample": first_sample,
            "packing": packing_summary(packing, packing_stats[k] if packing_stats and k >= start_phase else None,
                                       bin_rows[k] if bin_rows else 1, plan.phase.seq_len),
            "languages": rows,
        })
        first_sample += plan.num_samples
    return {
        "version": INDEX_VERSION, "key": key, "seed": int(seed), "start_phase": plans[start_phase].phase.name,
        "packing": packing,
        "manifest_sha256": sources[""],  # the run's data.manifest
        "sources_sha256": {sid: d for sid, d in sources.items() if sid},  # phase manifests

        "language_tokens": {lang: int(t) for lang, t in zip(languages, lang_tokens) if t > 0},
        "phases": phases,
    }


def write_index_plan(plan: Union[Dict, IndexPlan], folder: str) -> str:
    """``folder/index_plan.json``, written atomically (sorted keys, indent 1); returns its path."""
    path = os.path.join(folder, PLAN_FILE)
    atomic_write_json(path, plan.to_json() if isinstance(plan, IndexPlan) else plan, indent=1)
    return path


def phase_epochs(plan: Union[Dict, IndexPlan], phase: str) -> Dict[str, Dict[str, float]]:
    """:meth:`IndexPlan.phase_epochs` of a plan (typed, or its JSON object)."""
    return as_index_plan(plan).phase_epochs(phase)


def phase_end_positions(plan: Union[Dict, IndexPlan], phase: str) -> Dict[str, int]:
    """:meth:`IndexPlan.phase_end_positions` of a plan (typed, or its JSON object)."""
    return as_index_plan(plan).phase_end_positions(phase)


__all__ = ["PLAN_FILE", "IndexPlanError", "LanguagePhase", "PackingSummary", "PlanPhase", "IndexPlan",
           "as_index_plan", "stream_positions", "packing_summary", "index_plan", "write_index_plan",
           "phase_epochs", "phase_end_positions"]
