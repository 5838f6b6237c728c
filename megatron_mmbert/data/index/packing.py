"""The packing modes and their fixed parameters: ``data.packing`` (``concat``, ``best_fit``) and
``data.packed_row``, best_fit's packer constants (part of the cache key), the framing bits, the
columns of the packing statistics, and the checks of a packing request (mode, tokenizer, packed-row
geometry). What the modes do: the package docstring (:mod:`megatron_mmbert.data.index`)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from megatron_mmbert.data.schedule import PhasePlan

PACKING_MODES = ("concat", "best_fit")
"""``data.packing`` values (see the package docstring)."""
BEST_FIT_MIN_PIECE = 32
"""Non-first pieces of a long document with fewer content tokens than this (``<bos>`` / ``<eos>`` not
counted) are dropped (mmBERT)."""
BEST_FIT_WINDOW_ROWS = 16
"""Packed rows open at a time while best-fit packing (the reference keeps a device batch's packed rows
open: ``device batch / micro_batch_size`` of them, 12 for mmBERT's 4608 rows over 8 GPUs at 48)."""
BEST_FIT_BUFFER = 5120
"""Pieces deferred in one window before it closes (the reference's ``buffer_size`` default)."""
BEST_FIT_LOOKAHEAD_ROWS = 2
"""A window stops reading documents once this many ``seq_len`` rows' worth of tokens, plus half the room
of the packed rows still to come after it, wait deferred: what still waits when a phase's rows are
done is dropped (the stream moves by whole documents), so the last window reads ahead little and the
others far (their deferred pieces go first into the rows after them)."""
PACKED_ROWS = ("micro_batch", "seq_len")
"""``data.packed_row`` values: a best_fit packed row is a micro-batch (``micro_batch_size x seq_len``
tokens, the reference's geometry) or one ``seq_len`` row."""

FRAMING_BOS, FRAMING_EOS = 1, 2
"""Bits of :func:`~megatron_mmbert.data.index.documents.framing_flags` (what a stored document holds)
and of ``piece_flags`` (what the reader adds to a piece: ``<bos>`` before, ``<eos>`` after)."""

PACKING_STATS = ("row_tokens", "pad_tokens", "fragment_tokens", "segments", "bos_segments",
                 "dropped_short_tokens", "dropped_pending_tokens", "eos_segments")
"""Columns of ``phase{k}_packing_stats`` (int64 [L, 8]); dropped tokens are 0 for concat."""


def check_packing(packing: str) -> None:
    """Refuse a ``data.packing`` that is not one of :data:`PACKING_MODES`."""
    if packing not in PACKING_MODES:
        raise ValueError(f"data.packing must be one of {PACKING_MODES}, got {packing!r}")


def check_best_fit_tokenizer(manifest) -> None:
    """best_fit frames every piece ``<bos> ... <eos>``: the manifest's tokenizer must have both."""
    ids = manifest.tokenizer.special_ids
    missing = [role for role in ("bos", "eos") if ids.get(role) is None]
    if missing:
        raise ValueError(f"data.packing: best_fit frames every sequence <bos> ... <eos>, but tokenizer "
                         f"{manifest.tokenizer.name!r} has no {' or '.join(missing)}; use data.packing: concat")


def check_bin_rows(plans: List[PhasePlan], bin_rows: Optional[Sequence[int]]) -> List[int]:
    """``seq_len`` rows per best_fit packed row for each phase (``None``: 1 each), checked: a phase's
    samples must be whole packed rows (its global batch a multiple of its micro-batch size)."""
    if bin_rows is None:
        return [1] * len(plans)
    groups = [int(g) for g in bin_rows]
    if len(groups) != len(plans):
        raise ValueError(f"bin_rows has {len(groups)} entries for {len(plans)} phases")
    for plan, g in zip(plans, groups):
        if g < 1:
            raise ValueError(f"phase {plan.phase.name!r}: bin_rows must be >= 1, got {g}")
        if plan.num_samples % g:
            raise ValueError(
                f"phase {plan.phase.name!r}: {plan.num_samples} rows are not whole packed rows of {g} rows "
                f"(data.packed_row: micro_batch packs micro_batch_size x seq_len tokens); make its global "
                f"batch a multiple of its micro batch size, or set data.packed_row: seq_len")
    return groups


__all__ = ["PACKING_MODES", "PACKED_ROWS", "BEST_FIT_MIN_PIECE", "BEST_FIT_WINDOW_ROWS", "BEST_FIT_BUFFER",
           "BEST_FIT_LOOKAHEAD_ROWS", "FRAMING_BOS", "FRAMING_EOS", "PACKING_STATS", "check_packing",
           "check_best_fit_tokenizer", "check_bin_rows"]
