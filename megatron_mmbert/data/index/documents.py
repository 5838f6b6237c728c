"""What the index reads of a language's shards, per document, without loading them: lengths
(:func:`document_lengths`; best_fit's compact :func:`document_table`), first stored tokens (:func:`document_first_tokens`) and the framing flags
best_fit needs (:func:`framing_flags`: does a stored document start with ``<bos>`` / end with
``<eos>``). Shards are read through megatron-core's ``IndexedDataset`` (the ``.idx``; a small one read
whole, :data:`SMALL_INDEX_BYTES`) a chunk of documents at a time, and tokens straight from the ``.bin`` through bounded windows, so the memory
stays a few MB whatever a shard's size."""

from __future__ import annotations

import mmap
from typing import Sequence

import numpy as np

from megatron_mmbert.data.index.extension import load_extension
from megatron_mmbert.data.index.packing import FRAMING_BOS, FRAMING_EOS

FIRST_TOKEN_WINDOW = 8 << 20
"""Bytes of a ``.bin`` mapped at a time while reading documents' first / last tokens: the pages a read
touches count in the RSS while mapped, one window per language on a thread (16 threads: 128 MB; 64 MB
windows made two threads' peak grow 1.2x with the corpus, and cost no less time)."""

DOCUMENT_CHUNK = 1 << 16
"""Documents of a shard read at a time (their lengths and first tokens): the temporaries stay a
few MB whatever the shard's size, beside the int32 / int8 per-document results."""


SMALL_INDEX_BYTES = 1 << 20
"""An ``.idx`` of at most this size is read whole, once (:class:`_SmallIndex`), instead of opened through
``IndexedDataset`` (a mapping of the ``.idx`` and of the ``.bin``, ~20 system calls each time, each
releasing the GIL: on two threads a hand-off to the other thread and back, for each of the 1833 mostly
small languages; RESULTS "part 6"). The same bytes, the same values."""


class _SmallIndex:
    """A small shard's ``.idx`` (:func:`~megatron_mmbert.data.shards.read_index`, megatron-core's checks)
    with the attributes of ``IndexedDataset`` this module reads."""

    def __init__(self, prefix: str):
        from megatron_mmbert.data.shards import read_index

        self.index = read_index(prefix)
        self.document_indices = self.index.document_indices
        self.sequence_lengths = self.index.sequence_lengths


def _open_index(prefix: str):
    import os

    from megatron_mmbert.data.shards import idx_path

    if os.path.getsize(idx_path(prefix)) <= SMALL_INDEX_BYTES:
        return _SmallIndex(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _document_chunks(prefixes: Sequence[str]):
    """``(prefix, IndexedDataset, document_indices[a : b + 1] as int64)`` over every shard, at most
    :data:`DOCUMENT_CHUNK` documents at a time (megatron-core reads the ``.idx``; a small one is read
    whole, :data:`SMALL_INDEX_BYTES`). Each chunk opens
    the shard afresh: megatron-core maps the whole ``.idx`` and the pages a read touches count in the
    RSS until the mapping closes (~20 bytes a document: 95 MB for eng_Latn at 1/100 of FineWeb2)."""
    for prefix in prefixes:
        ds = _open_index(prefix)
        n = len(ds.document_indices) - 1
        if isinstance(ds, _SmallIndex):  # held whole already: no mapping to close
            for a in range(0, max(n, 0), DOCUMENT_CHUNK):
                yield prefix, ds, np.asarray(ds.document_indices[a:min(a + DOCUMENT_CHUNK, n) + 1], dtype=np.int64)
            del ds
            continue
        del ds
        for a in range(0, max(n, 0), DOCUMENT_CHUNK):
            ds = _open_index(prefix)
            docs = np.asarray(ds.document_indices[a:min(a + DOCUMENT_CHUNK, n) + 1], dtype=np.int64)
            yield prefix, ds, docs
            del ds


def _count_documents(prefixes: Sequence[str]) -> int:
    return sum(max(len(_open_index(p).document_indices) - 1, 0) for p in prefixes)


def _first_tokens(prefix: str, ds, docs: np.ndarray) -> np.ndarray:
    """int64: the first stored token of documents starting at sequences ``docs`` (-1: empty)."""
    nonempty = np.asarray(ds.sequence_lengths[docs]) > 0 if len(docs) else np.zeros(0, bool)
    pointers = np.asarray(ds.index.sequence_pointers[docs[nonempty]], dtype=np.int64) if nonempty.any() else None
    return _tokens_at(prefix, ds, nonempty, pointers)


def _last_tokens(prefix: str, ds, docs: np.ndarray) -> np.ndarray:
    """int64: the last stored token of the documents of ``docs`` (``document_indices[a : b + 1]``; -1
    where a document's last sequence is empty). The build reads last tokens through
    :func:`_first_and_last_tokens`; this separate read is its oracle in the tests."""
    last = docs[1:] - 1
    lengths = np.asarray(ds.sequence_lengths[last], dtype=np.int64) if len(last) else np.zeros(0, np.int64)
    nonempty = (lengths > 0) & (docs[1:] > docs[:-1])
    pointers = None
    if nonempty.any():
        itemsize = np.dtype(ds.index.dtype).itemsize
        pointers = (np.asarray(ds.index.sequence_pointers[last[nonempty]], dtype=np.int64)
                    + (lengths[nonempty] - 1) * itemsize)
    return _tokens_at(prefix, ds, nonempty, pointers)


def _tokens_at(prefix: str, ds, nonempty: np.ndarray, pointers) -> np.ndarray:
    """int64 [len(nonempty)]: the token at byte ``pointers`` (increasing) of the ``.bin`` where
    ``nonempty``, -1 elsewhere."""
    first = np.full(len(nonempty), -1, dtype=np.int64)
    if pointers is not None and len(pointers):
        dtype = np.dtype(ds.index.dtype)
        ext = load_extension()
        if dtype.kind in "iu" and hasattr(ext, "tokens_at"):  # C++, the GIL released: threads read at once
            first[nonempty] = ext.tokens_at(prefix + ".bin", np.ascontiguousarray(pointers, dtype=np.int64),
                                            dtype.str, FIRST_TOKEN_WINDOW)
            return first
        values = np.empty(len(pointers), dtype=np.int64)
        # One mapping per FIRST_TOKEN_WINDOW bytes of the .bin: the pages a read touches count
        # in the process's RSS while mapped, so a whole large shard mapped at once would.
        window = np.searchsorted(pointers, pointers[0] + FIRST_TOKEN_WINDOW * np.arange(
            1, (pointers[-1] - pointers[0]) // FIRST_TOKEN_WINDOW + 2))
        a = 0
        for b in np.unique(window):
            if b <= a:
                continue
            lo = int(pointers[a]) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            tokens = np.memmap(prefix + ".bin", dtype=np.uint8, mode="r", offset=lo,
                               shape=(int(pointers[b - 1]) + dtype.itemsize - lo,))
            at = (pointers[a:b] - lo)[:, None] + np.arange(dtype.itemsize)
            values[a:b] = np.ascontiguousarray(tokens[at]).view(dtype)[:, 0]
            del tokens
            a = int(b)
        first[nonempty] = values
    return first


def document_first_tokens(prefixes: Sequence[str]) -> np.ndarray:
    """int64 [D]: the first stored token of every document over a language's shards (-1 for an
    empty document), read straight from the ``.bin`` at each document's first sequence pointer."""
    parts = [_first_tokens(prefix, ds, docs[:-1]) for prefix, ds, docs in _document_chunks(prefixes)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _length_chunks(prefixes: Sequence[str]):
    """``(at, lengths int64)``: tokens per document over a language's shards, in shard order, a chunk
    of at most :data:`DOCUMENT_CHUNK` documents at a time (``at``: the chunk's first document)."""
    at = 0
    for _, ds, docs in _document_chunks(prefixes):
        seq = np.asarray(ds.sequence_lengths[docs[0]:docs[-1]], dtype=np.int64)
        ends = np.concatenate([[0], np.cumsum(seq)])
        part = ends[docs[1:] - docs[0]] - ends[docs[:-1] - docs[0]]
        if part.size and part.max() > np.iinfo(np.int32).max:
            raise ValueError(f"a document in {prefixes} is longer than 2^31 tokens")
        yield at, part
        at += len(part)


def document_lengths(prefixes: Sequence[str]) -> np.ndarray:
    """int32 [D]: tokens per document over a language's shards, in shard order (megatron-core's
    ``IndexedDataset`` reads the ``.idx``; a document is its consecutive sequences)."""
    lengths = np.empty(_count_documents(prefixes), dtype=np.int32)
    for at, part in _length_chunks(prefixes):
        lengths[at:at + len(part)] = part
    return lengths


COMPACT_LONG = 0x3FFF
"""The largest length a compact document table (:func:`document_table`) stores in place: a document
of this many tokens or more is marked with it and its length kept in the table's long rows."""


def document_table(prefixes: Sequence[str], framing: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """A language's documents as ``_index_builder.BestFitPacker`` reads them in 2 bytes a document
    (:func:`document_lengths` and ``framing`` take 5): ``packed`` uint16 [D], the length in bits 0-13
    (:data:`COMPACT_LONG` for a document of that many tokens or more) and the framing flags in bits
    14-15; ``long`` int64 [n, 2], (document, length) of the long documents in increasing order (few:
    FineWeb2's documents average ~600 tokens). Built chunk by chunk: no int32 [D] is ever held."""
    if len(framing) != _count_documents(prefixes):
        raise ValueError(f"{len(framing)} framing flags for {_count_documents(prefixes)} documents in {prefixes}")
    packed = np.empty(len(framing), dtype=np.uint16)
    longs = []
    for at, part in _length_chunks(prefixes):
        n = len(part)
        long = part >= COMPACT_LONG
        packed[at:at + n] = np.minimum(part, COMPACT_LONG).astype(np.uint16) | (
            framing[at:at + n].astype(np.uint16) << 14)
        if long.any():
            longs.append(np.stack([np.flatnonzero(long) + at, part[long]], axis=1))
    return packed, (np.concatenate(longs).astype(np.int64) if longs else np.zeros((0, 2), np.int64))


def framing_flags(manifest, lang: str, pool=None, workers: int = 1) -> np.ndarray:
    """int8 [D]: per document of ``lang``, 1 when it starts with the tokenizer's ``<bos>`` in the shards,
    plus 2 when it ends with its ``<eos>`` (``FRAMING_BOS`` / ``FRAMING_EOS``). ``pool`` (an executor of
    ``workers`` threads): its chunks of :data:`DOCUMENT_CHUNK` documents are read there, a few at a time
    (the read releases the GIL), so one large language's scan is spread over the threads. From the manifest's
    framing record, checked on a sample, where preprocessing wrote one (``framing_record.py``)."""
    from megatron_mmbert.data.index.framing_record import recorded_framing_flags

    recorded = recorded_framing_flags(manifest, lang)
    if recorded is not None:
        return recorded
    ids = manifest.tokenizer.special_ids
    bos, eos = ids.get("bos"), ids.get("eos")
    prefixes = manifest.languages[lang].shards
    flags = np.zeros(_count_documents(prefixes), dtype=np.int8)

    def chunk(at, prefix, ds, docs):
        n = len(docs) - 1
        first, last = _first_and_last_tokens(prefix, ds, docs)
        if bos is not None:
            flags[at:at + n] |= (first == bos).astype(np.int8) * FRAMING_BOS
        if eos is not None:
            flags[at:at + n] |= (last == eos).astype(np.int8) * FRAMING_EOS

    at, jobs = 0, []
    for prefix, ds, docs in _document_chunks(prefixes):
        if pool is None:
            chunk(at, prefix, ds, docs)
        else:  # at most 2 x the pool's threads chunks queued: their document indices are held
            while len(jobs) >= 2 * max(1, workers):
                jobs.pop(0).result()
            jobs.append(pool.submit(chunk, at, prefix, ds, docs))
        at += len(docs) - 1
    for job in jobs:
        job.result()
    return flags


def _first_and_last_tokens(prefix: str, ds, docs: np.ndarray):
    """:func:`_first_tokens` and :func:`_last_tokens` of the documents of ``docs`` in one pass over the
    ``.bin`` (a document's first and last tokens mostly share a page: each page is touched once)."""
    starts, last = docs[:-1], docs[1:] - 1
    n = len(starts)
    f_len = np.asarray(ds.sequence_lengths[starts], dtype=np.int64) if n else np.zeros(0, np.int64)
    l_len = np.asarray(ds.sequence_lengths[last], dtype=np.int64) if n else np.zeros(0, np.int64)
    f_ok = f_len > 0
    l_ok = (l_len > 0) & (docs[1:] > docs[:-1])
    itemsize = np.dtype(ds.index.dtype).itemsize
    f_ptr = np.asarray(ds.index.sequence_pointers[starts[f_ok]], dtype=np.int64) if f_ok.any() else np.zeros(0, np.int64)
    l_ptr = (np.asarray(ds.index.sequence_pointers[last[l_ok]], dtype=np.int64) + (l_len[l_ok] - 1) * itemsize
             if l_ok.any() else np.zeros(0, np.int64))
    pointers = np.concatenate([f_ptr, l_ptr])
    order = np.argsort(pointers, kind="stable")  # _tokens_at reads increasing pointers
    values = _tokens_at(prefix, ds, np.ones(len(pointers), bool), pointers[order] if len(pointers) else None)
    merged = np.empty(len(pointers), np.int64)
    merged[order] = values
    first = np.full(n, -1, np.int64)
    last_tokens = np.full(n, -1, np.int64)
    first[f_ok] = merged[:len(f_ptr)]
    last_tokens[l_ok] = merged[len(f_ptr):]
    return first, last_tokens


__all__ = ["FIRST_TOKEN_WINDOW", "DOCUMENT_CHUNK", "SMALL_INDEX_BYTES", "COMPACT_LONG", "document_first_tokens",
           "document_lengths", "document_table", "framing_flags"]
