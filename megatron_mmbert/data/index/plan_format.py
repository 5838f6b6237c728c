"""The index plan as text (:func:`format_index_plan`): one table per phase with the languages drawn
(largest first, top and bottom rows when long), the packing measured, the epochs summary and a warning
for languages repeated too often. ``tools/build_data_index.py`` prints it; a run logs it at start-up
and at each phase."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from megatron_mmbert.data.index.plan import IndexPlan, LanguagePhase, PlanPhase, as_index_plan
from megatron_mmbert.data.schedule import _fmt_tokens


def _packing_line(p: PlanPhase) -> str:
    pk = p.packing
    geometry = ""
    if pk.rows_per_packed_row:
        geometry = f" (packed rows of {pk.rows_per_packed_row} x {p.seq_len} = {pk.packed_row_tokens:,} tokens)"
    if pk.pad_fraction is None:
        return f"  packing {pk.mode}{geometry}"
    return (f"  packing {pk.mode}: padding {100 * pk.pad_fraction:.{3 if geometry else 2}f}% of row tokens{geometry}, "
            f"{100 * pk.fragment_token_fraction:.2f}% of tokens in document fragments, "
            f"{100 * pk.bos_start_fraction:.2f}% of segments start with <bos>"
            + (f", {100 * pk.eos_end_fraction:.2f}% end with <eos>" if pk.mode == "best_fit" else ""))


def _summary_lines(plan: IndexPlan, p: PlanPhase, active: List[Tuple[str, LanguagePhase]],
                   warn_epochs: float) -> List[str]:
    e = sorted(r.epochs for _, r in active)
    worst = max(active, key=lambda x: x[1].epochs)
    out = [f"  epochs by the end of the phase: min {e[0]:.3g} / median {e[len(e) // 2]:.3g} / "
           f"max {e[-1]:.3g} ({worst[0]})"]
    within: Dict[str, Dict[str, float]] = plan.phase_epochs(p.name)
    most = max(within, key=lambda lang: (within[lang]["in_phase"], lang))
    out.append(f"  epochs within the phase: max {within[most]['in_phase']:.3g} ({most})")
    over = sum(r.epochs > warn_epochs for _, r in active)
    if over:
        out.append(f"  WARNING: {over} language(s) seen more than {warn_epochs:g} times by the end of "
                   "this phase; consider max_epochs_per_language or a higher temperature")
    return out


def _phase_table(plan: IndexPlan, p: PlanPhase, warn_epochs: float, head: int, tail: int) -> List[str]:
    active = [(lang, r) for lang, r in p.languages.items() if r.rows > 0]
    active.sort(key=lambda x: (-x[1].rows, x[0]))
    total = max(sum(r.rows for _, r in active), 1)
    state = "" if p.built else " (before this run's start phase: planned, not built)"
    out = [f"phase {p.index} {p.name!r}: {p.samples:,} rows x {p.seq_len} tokens, "
           f"{len(active)} languages, samples from #{p.first_sample:,}{state}",
           _packing_line(p),
           f"  {'language':<16} {'rows':>12} {'tokens':>10} {'share %':>9} {'first_token':>14} {'epochs':>9}"]

    def line(lang: str, r: LanguagePhase) -> str:
        flag = "  !" if r.epochs > warn_epochs else ""
        return (f"  {lang:<16} {r.rows:>12,} {_fmt_tokens(r.tokens):>10} {100 * r.rows / total:>9.4f} "
                f"{r.first_token:>14,} {r.epochs:>9.3f}{flag}")

    shown = active if len(active) <= head + tail + 1 else active[:head] + [None] + active[-tail:]
    for item in shown:
        out.append(f"  ... {len(active) - head - tail} more languages ..." if item is None else line(*item))
    if active:
        out += _summary_lines(plan, p, active, warn_epochs)
    return out + [""]


def format_index_plan(plan: Union[Dict, IndexPlan], warn_epochs: float = 5.0, head: int = 15, tail: int = 5,
                      phases: Optional[Sequence[str]] = None) -> str:
    """The plan (typed, or its JSON object) as text, one table per phase (only ``phases`` when given):
    the languages with rows (largest first; top/bottom rows when long) with rows, tokens, share,
    first_token and cumulative epochs, and a summary."""
    typed = as_index_plan(plan)
    out: List[str] = []
    for p in typed.phases:
        if phases is None or p.name in phases:
            out += _phase_table(typed, p, warn_epochs, head, tail)
    return "\n".join(out).rstrip("\n")


__all__ = ["format_index_plan"]
