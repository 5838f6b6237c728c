"""Packing, language by language: a language's rows of every phase, made in resumable blocks by the
C++ packers (``RowPacker`` for concat, ``BestFitPacker`` for best_fit) and written as they come
(:func:`pack_language`), into the phase files (:class:`PhaseFiles`, one :class:`NpyAppender` per
array and phase) or, on a worker thread, into the language's own spill files (:class:`SpillFiles`)
that the build's main thread copies in language order. Which languages run on which thread:
:mod:`~megatron_mmbert.data.index.build`."""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Sequence

import numpy as np

from megatron_mmbert.data.index.documents import document_lengths, document_table, framing_flags
from megatron_mmbert.data.index.extension import language_stream
from megatron_mmbert.data.index.npy import NpyAppender
from megatron_mmbert.data.index.packing import (
    BEST_FIT_BUFFER,
    BEST_FIT_LOOKAHEAD_ROWS,
    BEST_FIT_MIN_PIECE,
    BEST_FIT_WINDOW_ROWS,
    PACKING_STATS,
)
from megatron_mmbert.data.schedule import PhasePlan

PACK_BLOCK_TOKENS = 1 << 26
"""Row tokens a packer makes per block (best_fit: whole windows of packed rows, at least one): each
block is written out as it is made, so a language's phase is never whole in memory."""


class PhaseFiles:
    """The phase files of the packed rows (:class:`NpyAppender` each); one language's blocks go
    straight in (``append``) or, built on another thread, through its :class:`SpillFiles`."""

    NAMES = ("doc", "rows", "pieces", "flags", "ptr")

    def __init__(self, path, K: int):
        self.out = [{"doc": NpyAppender(path(f"phase{k}_doc_index"), np.int32),
                     "rows": NpyAppender(path(f"phase{k}_sample_idx"), np.int32, (2,), wide=np.int64),
                     "pieces": NpyAppender(path(f"phase{k}_pieces"), np.int32, (3,)),
                     "flags": NpyAppender(path(f"phase{k}_piece_flags"), np.int8),
                     "ptr": NpyAppender(path(f"phase{k}_row_ptr"), np.int32, wide=np.int64)} for k in range(K)]

    def append(self, k: int, name: str, chunk) -> None:
        self.out[k][name].append(chunk)

    def close(self) -> None:
        for acc in self.out:
            for f in acc.values():
                f.close()


SPILL_MEMORY_BYTES = 16 << 20
"""Bytes of finished blocks the languages built on worker threads may hold in memory together while they
wait for their turn in language order (:class:`SpillMemory`); the rest waits in spill folders on disk."""

SPILL_CHUNK_OVERHEAD = 128
"""Bytes a held block counts for beside its data (the array object): thousands of tiny blocks still
count against :data:`SPILL_MEMORY_BYTES`."""


class SpillMemory:
    """The bytes every language's :class:`SpillFiles` may hold in memory together (``limit``), shared
    by the worker threads: a language's blocks wait in memory while they fit and go to its spill
    folder otherwise. Most of the 1833 languages are a few KB: held in memory, they cost no folder,
    no files created, written, copied and removed (on two threads those file operations, beside the
    GIL hand-offs around each, took most of the build's system time: RESULTS "part 6")."""

    def __init__(self, limit: "int | None" = None):
        import threading

        self.limit = int(SPILL_MEMORY_BYTES if limit is None else limit)
        self.used, self._lock = 0, threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class SpillFiles:
    """One language's blocks, built on a worker thread, kept until the main thread copies them into the
    phase files in language order (:meth:`copy_into`): in memory while ``memory``
    (:class:`SpillMemory`) has room, else in raw files of its own ``folder`` (made when first needed)."""

    COPY_ROWS = 1 << 20

    def __init__(self, folder: str, memory: "SpillMemory | None" = None):
        self.folder, self.memory = folder, memory
        self.files = {}  # (phase, name) -> [file, dtype, row shape, rows]
        self.held = {}  # (phase, name) -> chunks held in memory, in order
        self.held_bytes = 0
        self.on_disk = memory is None

    def append(self, k: int, name: str, chunk) -> None:
        chunk = np.ascontiguousarray(chunk)
        if not self.on_disk:
            n = chunk.nbytes + SPILL_CHUNK_OVERHEAD
            if self.memory.take(n):
                self.held.setdefault((k, name), []).append(chunk)
                self.held_bytes += n
                return
            self._to_disk()
        self._write(k, name, chunk)

    def _to_disk(self) -> None:
        """Out of memory budget: what is held goes to the folder's files (in order), as will what follows."""
        self.on_disk = True
        for (k, name), chunks in self.held.items():
            for chunk in chunks:
                self._write(k, name, chunk)
        self.held = {}
        self.memory.give(self.held_bytes)
        self.held_bytes = 0

    def _write(self, k: int, name: str, chunk) -> None:
        if (k, name) not in self.files:
            if not self.files:
                os.makedirs(self.folder)
            self.files[(k, name)] = [open(os.path.join(self.folder, f"{k}_{name}"), "wb"), chunk.dtype,
                                     chunk.shape[1:], 0]
        entry = self.files[(k, name)]
        chunk.astype(entry[1], copy=False).tofile(entry[0])
        entry[3] += len(chunk)

    def close(self) -> None:
        for entry in self.files.values():
            entry[0].close()

    def release(self) -> None:
        """Give back the memory held (copied, or the build failed) and remove the folder, if any."""
        self.held = {}
        if self.memory is not None:
            self.memory.give(self.held_bytes)
        self.held_bytes = 0
        if self.files:
            self.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            self.files = {}

    def copy_into(self, files: PhaseFiles) -> None:
        for (k, name), chunks in sorted(self.held.items()):
            for chunk in chunks:
                files.append(k, name, chunk)
        # Read, not mapped: the pages of a mapping would count in the RSS until it is closed.
        for (k, name), (f, dtype, shape, rows) in sorted(self.files.items()):
            out = files.out[k][name]
            if out.dtype == dtype and out.row_shape == tuple(shape):  # the same bytes: a kernel copy
                out.append_file(f.name, rows)
                continue
            width = int(np.prod(shape, dtype=np.int64))
            with open(f.name, "rb") as fh:
                for a in range(0, rows, self.COPY_ROWS):
                    n = min(self.COPY_ROWS, rows - a)
                    files.append(k, name, np.fromfile(fh, dtype=dtype, count=n * width).reshape((n,) + tuple(shape)))
        self.release()


def _pack_concat(ext, lengths, framing, plan: PhasePlan, rows: int, start: int, seed: int, lang: str, k: int,
                 sink) -> "tuple[np.ndarray, int, int]":
    """Phase ``k``'s concat rows of one language in blocks (``_index_builder.RowPacker``), written to
    ``sink``; returns (stats [8], doc_index entries, sample_idx entries). ``concat_stats`` runs per
    block on the epochs the block's rows touch (the walk never goes back an epoch)."""
    D = len(lengths)
    packer = ext.RowPacker(lengths, plan.phase.seq_len, rows, start, int(seed), language_stream(lang))
    block = max(PACK_BLOCK_TOKENS // plan.phase.seq_len, 1)
    stats, n_docs, n_rows = np.zeros(len(PACKING_STATS), np.int64), 0, 0
    last_epoch, last_row, loaded = np.zeros(0, np.int32), None, 0  # the epoch the walk stands in
    while not packer.done:
        docs, sample_idx = packer.next(block)
        sink.append(k, "doc", docs)
        sink.append(k, "rows", sample_idx)
        window = np.concatenate([last_epoch, docs])
        base = max(loaded - 1, 0) * D  # doc_index position of window[0]
        rows_here = sample_idx if last_row is None else np.concatenate([last_row, sample_idx])
        st = ext.concat_stats(lengths, framing, window, rows_here - np.array([base, 0], np.int64))
        stats += [st.get(c, 0) for c in PACKING_STATS]
        loaded += len(docs) // max(D, 1)
        last_epoch = window[-D:] if len(window) >= D and D else window
        last_row = sample_idx[-1:]
        n_docs += len(docs)
        n_rows += len(sample_idx)
    return stats, n_docs, n_rows


def _pack_best_fit(ext, table, plan: PhasePlan, packed_rows: int, g: int, start: int, seed: int,
                   lang: str, k: int, sink) -> "tuple[np.ndarray, int, int, int]":
    """Phase ``k``'s best_fit packed rows of one language in blocks of whole windows
    (``_index_builder.BestFitPacker``) of the language's compact ``table`` (:func:`document_table`),
    written to ``sink`` (None: counted, not stored); returns (stats [8], end_token, pieces written,
    row_ptr entries written)."""
    packed, long = table
    packer = ext.BestFitPacker(packed, None, plan.phase.seq_len, packed_rows, start, int(seed),
                               language_stream(lang), g, BEST_FIT_WINDOW_ROWS, BEST_FIT_BUFFER,
                               BEST_FIT_LOOKAHEAD_ROWS, BEST_FIT_MIN_PIECE, long_documents=long)
    block = max(PACK_BLOCK_TOKENS // (g * plan.phase.seq_len), 1)
    n_pieces, n_ptr = 0, 1
    if sink is not None:
        sink.append(k, "ptr", np.zeros(1, np.int64))
    while not packer.done:
        pieces, flags, row_ends = packer.next(block)
        if sink is not None:
            sink.append(k, "pieces", pieces)
            sink.append(k, "flags", flags)
            sink.append(k, "ptr", row_ends)
            n_pieces += len(pieces)
            n_ptr += len(row_ends)
    st = packer.stats()
    return np.array([st[c] for c in PACKING_STATS], np.int64), packer.end_token, n_pieces, n_ptr


EMPTY = {"rows": np.zeros((1, 2), np.int64), "ptr": np.zeros(1, np.int64)}
"""A language-phase without rows: one ``sample_idx`` entry and one ``row_ptr`` entry (both packings)."""


def pack_language(ext, manifest, lang: str, plans: List[PhasePlan], counts: np.ndarray, concat_starts: np.ndarray,
                   seed: int, start_phase: int, packing: str, groups: Sequence[int], sink, framing_pool=None,
                  framing_workers: int = 1) -> Dict:
    """Every phase of one language (``counts``: its rows per phase), written to ``sink``: returns its
    ``stats`` [K, 8], stream ``positions`` [K + 1] (best_fit; concat's are ``concat_starts``) and per
    phase the entries written (``docs``, ``rows``, ``pieces``). ``framing_pool`` (an executor of
    ``framing_workers`` threads) reads the framing scan's chunks (:func:`framing_flags`)."""
    K = len(plans)
    # Framing first: its read maps up to FIRST_TOKEN_WINDOW bytes of the .bin, better without the lengths
    # already held beside it. What stays per document while the language packs (beside one epoch's
    # permutation, 4 bytes): best_fit's compact table (2 bytes; the flags folded in), concat's lengths
    # and framing (5 bytes: its RowPacker and concat_stats read int32 lengths).
    framing = framing_flags(manifest, lang, framing_pool, framing_workers)
    shards = manifest.languages[lang].shards
    if packing == "best_fit":
        table = document_table(shards, framing)
        del framing
    else:
        lengths = document_lengths(shards)
    res = {"stats": np.zeros((K, len(PACKING_STATS)), np.int64), "positions": np.zeros(K + 1, np.int64),
           "docs": [0] * K, "rows": [0] * K, "pieces": [0] * K}
    pos = 0
    for k, plan in enumerate(plans):
        rows, keep = int(counts[k]), k >= start_phase
        # The other packing's array gets its empty entry (as every language of every phase does).
        sink.append(k, "rows" if packing == "best_fit" else "ptr", EMPTY["rows" if packing == "best_fit" else "ptr"])
        if packing == "best_fit":
            res["positions"][k] = pos
            if rows:
                res["stats"][k], pos, res["pieces"][k], res["rows"][k] = _pack_best_fit(
                    ext, table, plan, rows // groups[k], groups[k], pos, seed, lang, k,
                    sink if keep else None)
            if not (rows and keep):  # an empty phase of this language: row_ptr [0]
                sink.append(k, "ptr", EMPTY["ptr"])
                res["rows"][k] = 1
        elif rows and keep:
            res["stats"][k], res["docs"][k], res["rows"][k] = _pack_concat(
                ext, lengths, framing, plan, rows, int(concat_starts[k]), seed, lang, k, sink)
        else:
            sink.append(k, "rows", EMPTY["rows"])
            res["rows"][k] = 1
    res["positions"][K] = pos
    return res


__all__ = ["PACK_BLOCK_TOKENS", "SPILL_MEMORY_BYTES", "EMPTY", "PhaseFiles", "SpillMemory", "SpillFiles", "pack_language"]
