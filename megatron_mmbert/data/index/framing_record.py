"""The framing flags from the manifest's record instead of the shards: preprocessing counts, per
language, the documents that start with ``<bos>`` and end with ``<eos>`` as it writes them
(``data/shards.py``: ``DocumentFraming``). When every document of a language does (or none does),
:func:`recorded_framing_flags` gives :func:`~megatron_mmbert.data.index.documents.framing_flags`'s
array without reading each document's first and last token -- on a real corpus that read touches
nearly every page of every ``.bin`` (terabytes), and was most of the index build's time.

The record is checked, never just trusted: the shards' ``.idx`` must hold the manifest's documents,
and a deterministic sample of documents (the first and last of every shard, and up to
:data:`SAMPLE_DOCUMENTS` spread over the language) is read from the ``.bin`` as the scan reads them;
any disagreement is an error naming the language, the shard and the fix, so a manifest that lies or
a shard replaced in place is refused (a sample, not a proof: a shard rewritten with mixed framing
may pass it, and is caught by no cheaper check). Manifests without the record keep the scan."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.index.extension import load_extension
from megatron_mmbert.data.index.packing import FRAMING_BOS, FRAMING_EOS
from megatron_mmbert.data.shards import INDEX_HEADER_BYTES, bin_path, idx_path, index_header

SMALL_FILE_BYTES = 1 << 20
"""A shard's ``.idx`` of at most this size is read whole, once, by the sample (:class:`_Entries`):
most of the 1833 languages are a few KB, and a ``pread`` per entry releases and retakes the GIL each time
(on two threads, a hand-off to the other thread and back: 200k context switches at 1/100, RESULTS "part 6")."""

SAMPLE_DOCUMENTS = 64
"""Documents spread evenly over a language whose framing is read from the shards to check its record
(besides the first and last document of every shard)."""


class FramingRecordMismatch(ConfigError):
    """The manifest's framing record disagrees with the shards (an input error: ``data.manifest``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="data.manifest")


def recorded_framing_flags(manifest, lang: str) -> Optional[np.ndarray]:
    """int8 [D]: ``framing_flags(manifest, lang)`` from the manifest's ``framing`` record, checked on a
    sample of the shards; None when the record is absent, counted other ids than the tokenizer's, or
    says the documents differ (some start with ``<bos>``, some do not: only the scan knows which)."""
    entry = manifest.languages[lang]
    record = entry.framing
    ids = manifest.tokenizer.special_ids
    bos, eos = ids.get("bos"), ids.get("eos")
    if record is None or (record.bos, record.eos) != (bos, eos):
        return None
    n = int(entry.documents)
    if record.starts_bos not in (0, n) or record.ends_eos not in (0, n):
        return None
    value = (FRAMING_BOS if bos is not None and record.starts_bos == n > 0 else 0) | (
        FRAMING_EOS if eos is not None and record.ends_eos == n > 0 else 0)
    _check_sample(manifest, lang, value)
    return np.full(n, value, dtype=np.int8)


def _fix(lang: str) -> str:
    return (f"re-run tools/preprocess_data.py for {lang} (or restore its shards), or delete the \"framing\" "
            f"record of {lang} from the manifest to have the index read every document's framing instead")


def _check_sample(manifest, lang: str, value: int) -> None:
    """Refuse the record unless the shards hold the manifest's documents and every sampled document's
    first / last stored token gives ``value``."""
    entry = manifest.languages[lang]
    prefixes = entry.shards
    counts = [_documents(p) for p in prefixes]
    if sum(counts) != entry.documents:
        raise FramingRecordMismatch(
            f"language {lang}: the manifest records {entry.documents} documents and their framing, but its "
            f"shards hold {sum(counts)} ({', '.join(f'{p}: {c}' for p, c in zip(prefixes, counts))}); "
            + _fix(lang))
    ids = manifest.tokenizer.special_ids
    bos, eos = ids.get("bos"), ids.get("eos")
    for prefix, local in _sample(counts, prefixes):
        firsts, lasts = _read_framing(prefix, np.asarray(local, dtype=np.int64))
        for d, first, last in zip(local, firsts.tolist(), lasts.tolist()):
            got = (FRAMING_BOS if bos is not None and first == bos else 0) | (
                FRAMING_EOS if eos is not None and last == eos else 0)
            if got != value:
                raise FramingRecordMismatch(
                    f"language {lang}: shard {prefix} document {d} starts with token {first} and ends with "
                    f"{last}, but the manifest's framing record says every document "
                    f"{_says(value, bos, eos)}; the shard was replaced or the record is wrong: " + _fix(lang))


def _documents(prefix: str) -> int:
    """Documents of a shard, from its ``.idx`` header."""
    with open(idx_path(prefix), "rb") as f:
        return max(_header(f.read(INDEX_HEADER_BYTES), prefix)[2] - 1, 0)


def _header(head: bytes, prefix: str) -> Tuple[np.dtype, int, int]:
    try:
        return index_header(head, idx_path(prefix))
    except ValueError as e:
        raise FramingRecordMismatch(f"{e}: re-run tools/preprocess_data.py") from None


class _Entries:
    """A shard's ``.idx`` entries and ``.bin`` tokens, each read with one ``pread``. The sample touches a
    few scattered entries: through a mapping (megatron-core's ``IndexedDataset``) each page fault maps
    whole folios of the file (+44 MB of RSS for 64 documents of a 4.7M-document ``.idx`` here), and reads
    ahead; ``pread`` reads just the bytes."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.idx = os.open(idx_path(prefix), os.O_RDONLY)
        self.bin = os.open(bin_path(prefix), os.O_RDONLY)
        self.whole = {}  # fd -> the .idx's bytes, where it is small (SMALL_FILE_BYTES); tokens: tokens()
        for fd in (self.idx, self.bin):
            size = os.fstat(fd).st_size
            if fd == self.idx and size <= SMALL_FILE_BYTES:
                self.whole[fd] = os.pread(fd, size, 0)
            elif hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.dtype, self.sequences, self.document_entries = _header(self._bytes(self.idx, INDEX_HEADER_BYTES, 0),
                                                                    prefix)

    def close(self) -> None:
        os.close(self.idx)
        os.close(self.bin)

    def _bytes(self, fd: int, n: int, offset: int) -> bytes:
        whole = self.whole.get(fd)
        return os.pread(fd, n, offset) if whole is None else whole[offset:offset + n]

    def _read(self, fd: int, offset: int, dtype, what: str) -> int:
        dtype = np.dtype(dtype)
        data = self._bytes(fd, dtype.itemsize, offset)
        if len(data) != dtype.itemsize:
            raise FramingRecordMismatch(f"shard {self.prefix}: its {what} ends before byte {offset + dtype.itemsize}, "
                                        "which its .idx points at; the shard is truncated or damaged: re-run "
                                        "tools/preprocess_data.py")
        return int(np.frombuffer(data, dtype=dtype)[0])

    def length(self, s: int) -> int:
        return self._read(self.idx, INDEX_HEADER_BYTES + 4 * s, "<i4", ".idx")

    def pointer(self, s: int) -> int:
        return self._read(self.idx, INDEX_HEADER_BYTES + 4 * self.sequences + 8 * s, "<i8", ".idx")

    def document_index(self, d: int) -> int:
        return self._read(self.idx, INDEX_HEADER_BYTES + 12 * self.sequences + 8 * d, "<i8", ".idx")

    def token(self, offset: int) -> int:
        return self._read(self.bin, offset, self.dtype, ".bin")

    def tokens(self, offsets: List[int]) -> List[int]:
        """The tokens at byte ``offsets`` of the ``.bin``, a ``pread`` each, in one call that releases the GIL
        once (``_index_builder.pread_tokens``): on two threads each release is a hand-off to the other
        thread and back. (Through ``tokens_at``'s mappings they cost more: each token faults in a whole
        folio; RESULTS "part 6".) A short read raises :meth:`token`'s error."""
        ext = load_extension()
        if not offsets or self.dtype.kind not in "iu" or not hasattr(ext, "pread_tokens"):
            return [self.token(o) for o in offsets]
        values, bad = ext.pread_tokens(bin_path(self.prefix), np.asarray(offsets, np.int64), self.dtype.str)
        if bad >= 0:
            return values[:bad].tolist() + [self.token(o) for o in offsets[bad:]]
        return values.tolist()


def _read_framing(prefix: str, local: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """int64: the first and last stored tokens (-1: none) of documents ``local`` of a shard, by the scan's
    rule (``documents._first_and_last_tokens``: a document's first token is its first sequence's, its last
    token its last sequence's, an empty sequence has none), every entry read with one ``pread``
    (:class:`_Entries`; a small ``.idx`` read whole): a few scattered reads cost ~40x less so than through a
    mapping."""
    first = np.full(len(local), -1, dtype=np.int64)
    last = np.full(len(local), -1, dtype=np.int64)
    shard = _Entries(prefix)
    try:
        size = shard.dtype.itemsize
        at, where = [], []  # token byte offsets in the .bin, and (array, i) each fills
        for i, d in enumerate(local.tolist()):
            a, b = shard.document_index(d), shard.document_index(d + 1)
            if a < shard.sequences and shard.length(a) > 0:
                at.append(shard.pointer(a))
                where.append((first, i))
            if b > a and shard.length(b - 1) > 0:
                at.append(shard.pointer(b - 1) + (shard.length(b - 1) - 1) * size)
                where.append((last, i))
        for (out, i), value in zip(where, shard.tokens(at)):
            out[i] = value
    finally:
        shard.close()
    return first, last


def _says(value: int, bos, eos) -> str:
    return (("starts with <bos> " + str(bos) if value & FRAMING_BOS else "does not start with <bos>")
            + " and " + ("ends with <eos> " + str(eos) if value & FRAMING_EOS else "does not end with <eos>"))


def _sample(counts: List[int], prefixes: List[str]):
    """``(prefix, sorted local document indices)`` of the sample: every shard's first and last document,
    and up to :data:`SAMPLE_DOCUMENTS` spread evenly over the language's documents."""
    total = sum(counts)
    spread = np.unique(np.linspace(0, total - 1, min(SAMPLE_DOCUMENTS, total)).round().astype(np.int64)) \
        if total else np.zeros(0, np.int64)
    start = 0
    for prefix, c in zip(prefixes, counts):
        if c:
            mine = spread[(spread >= start) & (spread < start + c)] - start
            yield prefix, sorted({0, c - 1, *mine.tolist()})
        start += c


__all__ = ["SAMPLE_DOCUMENTS", "FramingRecordMismatch", "recorded_framing_flags"]
