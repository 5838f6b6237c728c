"""The language sampling schedule: which languages each phase draws from, and how often.

For every ``PhaseConfig`` this module decides

* the **sample count**: ``ceil(tokens / seq_len)`` packed rows, rounded up to whole global batches
  when a global batch size is known (``PhaseConfig.tokens`` counts row capacity);
* the **active languages**: ``all`` (every manifest language with tokens), ``top:N`` (the N
  largest by tokens, ties broken by name) or an explicit list; languages named in ``fixed_shares``
  are active too. Named sources (``data/mixture.py``: ``dclm``, ``starcoder``, ...) are not
  languages of ``all``/``top:N``: they are active only where ``fixed_shares`` (or a list) names them;
* the **weights**: fixed shares for named languages/sources, and the remaining mass spread by
  temperature, ``p_i proportional to n_i ** tau`` (n_i = manifest tokens, tau = 1 natural,
  tau = 0 uniform), optionally with a UniMax-style cap: no temperature language may be repeated
  more than ``max_epochs_per_language`` epochs in the phase, its excess going to the uncapped ones
  in proportion to their temperature weights (water-filling);
* **annealing**: with ``temperature_end`` set, the phase is cut into ``anneal_segments`` equal
  segments and segment k uses tau at its middle, ``tau_k = tau + (tau_end - tau) * (k + 0.5) / K``.
  The blending index builder keeps each language's count within one sample of the cumulative
  target of these piecewise-constant weights (see ``megatron_mmbert.data.index``).

``format_table`` prints a phase as a table (share, tokens, samples, epochs per language, warnings
for languages repeated more than a chosen number of epochs); long tables show the top and bottom
rows and a summary.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError


@dataclasses.dataclass
class PhasePlan:
    """The sampling plan of one phase over a fixed, ordered list of languages."""

    phase: PhaseConfig
    """The phase configuration it was made from."""
    index: int
    """Position of the phase in the schedule (0-based)."""
    languages: List[str]
    """All languages of the schedule, in dataset order (column order of ``segment_weights``)."""
    tokens: np.ndarray
    """int64 [L]: manifest tokens per language."""
    active: np.ndarray
    """bool [L]: languages this phase may draw from (weight > 0 in some segment)."""
    num_samples: int
    """Packed rows of ``phase.seq_len`` tokens drawn in this phase."""
    segment_weights: np.ndarray
    """float64 [K, L]: normalised weights of each annealing segment (K = 1 without annealing)."""
    segment_sizes: np.ndarray
    """int64 [K]: samples per segment (sum = num_samples)."""
    segment_taus: List[float]
    """Temperature of each segment."""

    @property
    def mean_weights(self) -> np.ndarray:
        """Sample-weighted average weight per language over the phase."""
        if self.num_samples == 0:
            return np.zeros(len(self.languages))
        return (self.segment_sizes[:, None] * self.segment_weights).sum(0) / self.num_samples

    def expected_samples(self) -> np.ndarray:
        """Samples per language implied by the weights (the blend is within one sample of it)."""
        return self.mean_weights * self.num_samples

    def epochs(self, counts: Optional[np.ndarray] = None) -> np.ndarray:
        """Passes over each language's tokens (from realised ``counts`` when given)."""
        samples = self.expected_samples() if counts is None else np.asarray(counts, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            e = samples * self.phase.seq_len / self.tokens
        return np.where(self.tokens > 0, e, 0.0)


def phase_num_samples(phase: PhaseConfig, default_global_batch_size: Optional[int] = None) -> int:
    """Packed rows in ``phase``: ceil(tokens / seq_len), rounded up to whole global batches."""
    rows = -(-int(phase.tokens) // int(phase.seq_len))
    gbs = phase.global_batch_size or default_global_batch_size
    if gbs:
        rows = -(-rows // int(gbs)) * int(gbs)
    return rows


def active_languages(phase: PhaseConfig, languages: Sequence[str], tokens: np.ndarray) -> np.ndarray:
    """bool [L]: the phase's language set (see the module docstring), fixed-share names included."""
    where = f"phase {phase.name!r}"
    names = list(languages)
    index = {n: i for i, n in enumerate(names)}
    active = np.zeros(len(names), dtype=bool)
    spec = phase.languages
    # Named sources (dclm, starcoder, ...: data/mixture.py) are never temperature languages of
    # 'all' / 'top:N': they join a phase only through fixed_shares (or an explicit list).
    from megatron_mmbert.data.mixture import SOURCES

    language = tokens > 0
    language &= np.array([n not in SOURCES for n in names], dtype=bool)
    if isinstance(spec, str) and spec == "all":
        active = language.copy()
    elif isinstance(spec, str) and spec.startswith("top:"):
        n = int(spec[4:])
        if n < 1:
            raise ConfigError(f"{where}: languages 'top:{n}' needs N >= 1")
        # Largest first, ties by name, so the set does not depend on dict order.
        order = sorted((i for i in range(len(names)) if language[i]), key=lambda i: (-tokens[i], names[i]))
        active[order[:n]] = True
    elif isinstance(spec, (list, tuple)):
        unknown = [n for n in spec if n not in index]
        if unknown:
            raise ConfigError(
                f"{where}: languages {unknown[:5]} are not in the manifest "
                f"(it has {len(names)} languages, e.g. {names[:5]}); fix the list or preprocess them"
            )
        for n in spec:
            active[index[n]] = True
    else:
        raise ConfigError(f"{where}: languages must be 'all', 'top:N' or a list, got {spec!r}")
    for n in phase.fixed_shares:
        if n not in index:
            raise ConfigError(
                f"{where}: fixed_shares names {n!r}, which is not a manifest language "
                f"(sources such as code must be preprocessed as their own 'language')"
            )
        active[index[n]] = True
    empty = [names[i] for i in np.flatnonzero(active & (tokens <= 0))]
    if empty:
        raise ConfigError(f"{where}: languages {empty[:5]} have no tokens in the manifest")
    if not active.any():
        raise ConfigError(f"{where}: no active language")
    return active


def temperature_weights(
    tokens: np.ndarray,
    active: np.ndarray,
    tau: float,
    fixed: Optional[Dict[int, float]] = None,
    cap: Optional[np.ndarray] = None,
    where: str = "phase",
) -> np.ndarray:
    """float64 [L] summing to 1: fixed shares, the rest proportional to ``tokens ** tau``.

    ``fixed`` maps a column to its share; ``cap`` (share per column) bounds the temperature
    languages, their excess redistributed by water-filling in proportion to ``tokens ** tau``.
    """
    fixed = fixed or {}
    L = len(tokens)
    w = np.zeros(L, dtype=np.float64)
    for i, share in fixed.items():
        w[i] = share
    rest = 1.0 - sum(fixed.values())
    temp = active.copy()
    for i in fixed:
        temp[i] = False
    if not temp.any():
        if rest > 1e-12:
            raise ConfigError(
                f"{where}: fixed shares sum to {1 - rest:.6g} < 1 and no other active language takes "
                "the rest; add languages or make the shares sum to 1"
            )
        return w / w.sum()
    idx = np.flatnonzero(temp)
    # n ** tau in log space: exact ratios, no overflow for 1e12-token languages.
    logt = tau * np.log(tokens[idx].astype(np.float64))
    t = np.exp(logt - logt.max())
    p = np.zeros(len(idx))
    free = np.ones(len(idx), dtype=bool)
    mass = rest
    while True:
        p[free] = mass * t[free] / t[free].sum()
        if cap is None:
            break
        over = free & (p > cap[idx] * (1 + 1e-12))
        if not over.any():
            break
        p[over] = cap[idx][over]
        free &= ~over
        mass = rest - p[~free].sum()
        if not free.any():
            if mass > 1e-9:
                raise ConfigError(
                    f"{where}: the epoch cap leaves {mass:.3g} of the samples unplaced: every active "
                    "language would be repeated more than max_epochs_per_language; raise the cap, "
                    "add languages or lower the phase's tokens"
                )
            break
    w[idx] = p
    return w / w.sum()


def plan_phase(
    phase: PhaseConfig,
    languages: Sequence[str],
    tokens: Sequence[int],
    index: int = 0,
    default_global_batch_size: Optional[int] = None,
    anneal_segments: int = 64,
) -> PhasePlan:
    """The plan of one phase over ``languages`` (dataset order) with ``tokens`` each."""
    phase.validate()
    where = f"phase {phase.name!r}"
    tokens = np.asarray(tokens, dtype=np.int64)
    active = active_languages(phase, languages, tokens)
    num_samples = phase_num_samples(phase, default_global_batch_size)
    col = {n: i for i, n in enumerate(languages)}
    fixed = {col[n]: float(v) for n, v in phase.fixed_shares.items()}
    cap = None
    if phase.max_epochs_per_language is not None:
        if phase.max_epochs_per_language <= 0:
            raise ConfigError(f"{where}: max_epochs_per_language must be > 0")
        # Share at which a language would be read exactly max_epochs times in this phase.
        cap = phase.max_epochs_per_language * tokens / float(num_samples * phase.seq_len)
    if phase.temperature_end is None or phase.temperature_end == phase.temperature:
        taus = [float(phase.temperature)]
    else:
        k = max(1, min(int(anneal_segments), num_samples))
        taus = [
            phase.temperature + (phase.temperature_end - phase.temperature) * (j + 0.5) / k for j in range(k)
        ]
    k = len(taus)
    sizes = np.array([(num_samples * (j + 1)) // k - (num_samples * j) // k for j in range(k)], dtype=np.int64)
    weights = np.stack([temperature_weights(tokens, active, t, fixed, cap, where) for t in taus])
    return PhasePlan(
        phase=phase,
        index=index,
        languages=list(languages),
        tokens=tokens,
        active=(weights > 0).any(0),
        num_samples=num_samples,
        segment_weights=weights,
        segment_sizes=sizes,
        segment_taus=taus,
    )


def plan_schedule(
    phases: Sequence[PhaseConfig],
    language_tokens: Dict[str, int],
    default_global_batch_size: Optional[int] = None,
    anneal_segments: int = 64,
) -> List[PhasePlan]:
    """Plans for all phases over the languages of ``language_tokens`` (sorted by name)."""
    if not phases:
        raise ConfigError("the schedule has no phases")
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phase names must be unique, got {names}")
    languages = sorted(language_tokens)
    tokens = [int(language_tokens[n]) for n in languages]
    return [
        plan_phase(p, languages, tokens, i, default_global_batch_size, anneal_segments)
        for i, p in enumerate(phases)
    ]


def _fmt_tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(
    plan: PhasePlan,
    counts: Optional[np.ndarray] = None,
    warn_epochs: float = 5.0,
    head: int = 15,
    tail: int = 5,
) -> str:
    """The phase as text: one row per active language (top/bottom rows when long) and a summary.

    ``counts`` are realised samples per language (from the built index); without them the
    expected counts from the weights are shown.
    """
    ph = plan.phase
    samples = plan.expected_samples() if counts is None else np.asarray(counts, dtype=np.float64)
    epochs = plan.epochs(samples)
    share = samples / max(plan.num_samples, 1)
    idx = np.flatnonzero(plan.active)
    idx = idx[np.lexsort((np.array(plan.languages, dtype=object)[idx].astype(str), -share[idx]))]
    tau = f"{plan.segment_taus[0]:.3g}" + (
        f" -> {plan.segment_taus[-1]:.3g} ({len(plan.segment_taus)} segments)" if len(plan.segment_taus) > 1 else ""
    )
    lines = [
        f"phase {plan.index} {ph.name!r}: {plan.num_samples:,} rows x {ph.seq_len} tokens = "
        f"{_fmt_tokens(plan.num_samples * ph.seq_len)} tokens, {len(idx)} languages, tau {tau}, "
        f"mask rate {ph.mask_rate:g}" + (f" -> {ph.mask_rate_end:g}" if ph.mask_rate_end is not None else ""),
        f"  {'language':<16} {'tokens':>10} {'share %':>9} {'rows':>12} {'epochs':>9}",
    ]

    def row(i: int) -> str:
        flag = "  !" if epochs[i] > warn_epochs else ""
        fixed = " (fixed)" if plan.languages[i] in ph.fixed_shares else ""
        return (
            f"  {plan.languages[i]:<16} {_fmt_tokens(plan.tokens[i]):>10} {100 * share[i]:>9.4f} "
            f"{samples[i]:>12,.0f} {epochs[i]:>9.3f}{flag}{fixed}"
        )

    if len(idx) <= head + tail + 1:
        lines += [row(i) for i in idx]
    else:
        lines += [row(i) for i in idx[:head]]
        lines.append(f"  ... {len(idx) - head - tail} more languages ...")
        lines += [row(i) for i in idx[-tail:]]
    e = epochs[idx]
    lines.append(
        f"  summary: epochs min {e.min():.3g} / median {np.median(e):.3g} / max {e.max():.3g}; "
        f"share of top language {100 * share[idx[0]]:.2f}%"
    )
    over = idx[epochs[idx] > warn_epochs]
    if len(over):
        worst = over[np.argmax(epochs[over])]
        lines.append(
            f"  WARNING: {len(over)} language(s) repeat more than {warn_epochs:g} epochs in this phase "
            f"(worst: {plan.languages[worst]} at {epochs[worst]:.1f}); consider max_epochs_per_language "
            "or a higher temperature"
        )
    return "\n".join(lines)


__all__ = [
    "PhasePlan",
    "phase_num_samples",
    "active_languages",
    "temperature_weights",
    "plan_phase",
    "plan_schedule",
    "format_table",
]

