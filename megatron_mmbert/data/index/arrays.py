"""The built index as the reader sees it: :class:`PhaseIndex` (one phase's arrays and the rows they
describe) and :class:`DataIndex` (a schedule's phases, its folder and plan), the names of the arrays in
a cache folder (:data:`ARRAY_NAMES`, :func:`array_names`), loading them (:func:`load_arrays`, memory
mapped from the cache) and putting them together (:func:`assemble`)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_mmbert.data.index.packing import FRAMING_BOS, FRAMING_EOS
from megatron_mmbert.data.index.plan import IndexPlan
from megatron_mmbert.data.schedule import PhasePlan

ARRAY_NAMES = ("dataset_index", "dataset_sample_index", "counts", "doc_index", "doc_offsets", "sample_idx",
               "row_offsets", "pieces", "piece_flags", "piece_offsets", "row_ptr", "packing_stats")
"""The ``phase{k}_*`` arrays of the cache (plus ``stream_positions``)."""


def array_names(num_phases: int) -> List[str]:
    """Every array (``.npy`` file stem) of an index of ``num_phases`` phases."""
    return ["stream_positions"] + [f"phase{k}_{a}" for k in range(num_phases) for a in ARRAY_NAMES]


def load_arrays(folder: str, num_phases: int, mmap: bool = True) -> Dict[str, np.ndarray]:
    """The arrays of the index in ``folder``: memory-mapped read-only (``mmap``), or read whole."""
    return {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r" if mmap else None)
            for name in array_names(num_phases)}


@dataclasses.dataclass
class PhaseIndex:
    """The built arrays of one phase (``.npy`` memory maps once cached). Phases before the
    index's start phase are planned and counted but not built: their arrays are empty."""

    plan: PhasePlan
    """The phase's sampling plan."""
    built: bool
    """Whether rows of this phase can be read (False before the start phase)."""
    first_token: np.ndarray
    """int64 [L]: each language's stream position (tokens) where this phase starts."""
    dataset_index: np.ndarray
    """int16/int32 [N]: language column of each sample."""
    dataset_sample_index: np.ndarray
    """int32 (int64 when the phase's counts do not fit) [N]: the row of that language within this phase."""
    counts: np.ndarray
    """int64 [L]: samples per language in this phase."""
    doc_index: np.ndarray
    """int32: all languages' concatenated per-epoch document permutations for this phase."""
    doc_offsets: np.ndarray
    """int64 [L + 1]: language ``l``'s part of ``doc_index``."""
    sample_idx: np.ndarray
    """int32 (int64 when a value does not fit) [sum(counts + 1), 2]: language ``l``'s rows
    ``sample_idx[row_offsets[l] + r]`` .. ``+ 1``."""
    row_offsets: np.ndarray
    """int64 [L + 1]: language ``l``'s part of ``sample_idx`` (concat) or of ``row_ptr`` (best_fit)."""
    packing: str = "concat"
    """How the rows were packed (``concat`` or ``best_fit``)."""
    pieces: Optional[np.ndarray] = None
    """best_fit: int32 [P, 3] (document, token offset, stored tokens) of every piece, rows in order."""
    piece_flags: Optional[np.ndarray] = None
    """best_fit: int8 [P]: 1 where a ``<bos>`` is prepended to the piece, plus 2 where an ``<eos>`` is appended."""
    piece_offsets: Optional[np.ndarray] = None
    """best_fit: int64 [L + 1]: language ``l``'s part of ``pieces``."""
    row_ptr: Optional[np.ndarray] = None
    """best_fit: int32 (int64 when a value does not fit) [sum(counts / bin_rows + 1)]: packed row ``b`` of
    language ``l`` is pieces ``row_ptr[row_offsets[l] + b] .. + 1`` (relative to ``piece_offsets[l]``)."""
    bin_rows: int = 1
    """best_fit: ``seq_len`` rows per packed row (the phase's micro-batch size, or 1)."""

    def packed_row_pieces(self, lang: int, packed_row: int):
        """best_fit: ``[(document, token offset, end, piece_flags), ...]`` of packed row ``packed_row``
        of column ``lang``, in order (each piece: ``<bos>`` if ``flags & 1``, stored tokens, ``<eos>``
        if ``flags & 2``)."""
        base = int(self.row_offsets[lang]) + packed_row
        first = int(self.piece_offsets[lang])
        a, b = first + int(self.row_ptr[base]), first + int(self.row_ptr[base + 1])
        return [(int(d), int(o), int(o) + int(n), int(f))
                for (d, o, n), f in zip(self.pieces[a:b].tolist(), self.piece_flags[a:b].tolist())]

    def row_slices(self, lang: int, row: int):
        """best_fit: the pieces in ``seq_len`` row ``row`` of column ``lang`` (a slice of its packed
        row): ``[(document, token offset, end, piece_flags, lo, hi), ...]`` where ``[lo, hi)`` is the
        part of the framed piece (``<bos>`` and ``<eos>`` counted) inside this row: ``lo > 0`` when
        the piece began in the previous row, ``hi`` short of its length when it goes on in the next."""
        seq = self.plan.phase.seq_len
        b, part = divmod(int(row), self.bin_rows)
        lo, hi = part * seq, (part + 1) * seq
        out, at = [], 0
        for d, o, e, f in self.packed_row_pieces(lang, b):
            n = e - o + (f & FRAMING_BOS) + (f & FRAMING_EOS) // FRAMING_EOS
            a, at = at, at + n
            if at <= lo:
                continue
            if a >= hi:
                break
            out.append((d, o, e, f, max(lo - a, 0), min(hi, at) - a))
        return out

    def row_pieces(self, lang: int, row: int):
        """concat: ``[(document, token offset, end or None, 0), ...]`` making up row ``row`` of column
        ``lang`` (``end=None``: to the document's end). best_fit: :meth:`row_slices`."""
        if self.packing == "best_fit":
            return self.row_slices(lang, row)
        base = self.row_offsets[lang] + row
        (p0, o0), (p1, o1) = self.sample_idx[base], self.sample_idx[base + 1]
        docs = self.doc_index[self.doc_offsets[lang] : self.doc_offsets[lang + 1]]
        pieces = []
        p, o = int(p0), int(o0)
        while p < p1 or (p == p1 and o < o1):
            end = int(o1) if p == p1 else None
            pieces.append((int(docs[p]), o, end, 0))
            p, o = p + 1, 0
        return pieces


@dataclasses.dataclass
class DataIndex:
    """All index arrays of a schedule."""

    languages: List[str]
    """Dataset order (columns)."""
    phases: List[PhaseIndex]
    """One entry per phase, in schedule order."""
    path: str
    """The cache folder it was loaded from ('' when built in memory)."""
    plan: Dict
    """The index plan as JSON (:func:`~megatron_mmbert.data.index.plan.index_plan`; also
    ``index_plan.json`` in ``path``); :attr:`typed_plan` reads it into dataclasses."""

    @functools.cached_property
    def typed_plan(self) -> IndexPlan:
        """:attr:`plan` as an :class:`~megatron_mmbert.data.index.plan.IndexPlan` (read once)."""
        return IndexPlan.from_json(self.plan, os.path.join(self.path, "index_plan.json") if self.path else "the index plan")


def assemble(plans: List[PhasePlan], arrays, path: str, plan_json: Dict, start_phase: int,
             packing: str = "concat", bin_rows: Optional[Sequence[int]] = None) -> DataIndex:
    """The :class:`DataIndex` of ``plans`` over ``arrays`` (name -> array: :func:`array_names`, loaded
    or memory-mapped), found in ``path`` ('' in memory), with its plan ``plan_json``."""
    phases = []
    positions = np.asarray(arrays["stream_positions"])
    for k, plan in enumerate(plans):
        phases.append(
            PhaseIndex(
                plan=plan,
                built=k >= start_phase,
                first_token=positions[k],
                dataset_index=arrays[f"phase{k}_dataset_index"],
                dataset_sample_index=arrays[f"phase{k}_dataset_sample_index"],
                counts=arrays[f"phase{k}_counts"],
                doc_index=arrays[f"phase{k}_doc_index"],
                doc_offsets=arrays[f"phase{k}_doc_offsets"],
                sample_idx=arrays[f"phase{k}_sample_idx"],
                row_offsets=arrays[f"phase{k}_row_offsets"],
                packing=packing,
                pieces=arrays[f"phase{k}_pieces"],
                piece_flags=arrays[f"phase{k}_piece_flags"],
                piece_offsets=arrays[f"phase{k}_piece_offsets"],
                row_ptr=arrays[f"phase{k}_row_ptr"],
                bin_rows=int(bin_rows[k]) if packing == "best_fit" and bin_rows else 1,
            )
        )
    return DataIndex(languages=plans[0].languages, phases=phases, path=path, plan=plan_json)


__all__ = ["ARRAY_NAMES", "PhaseIndex", "DataIndex", "array_names", "load_arrays", "assemble"]
