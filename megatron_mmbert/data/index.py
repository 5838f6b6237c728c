"""The python side of the C++ index builder: dtype-checked wrappers, the index arrays of a whole
schedule, and their cache.

What gets built for a manifest and a list of phases (``build_data_index``):

* per phase ``k``: ``dataset_index`` (int16, or int32 beyond 32767 languages: which language
  each of the phase's samples comes from) and ``dataset_sample_index`` (int32, int64 past 2^31 rows: which packed row
  of that language, counted from the language's first row in this phase), from the greedy
  largest-deficit interleave of ``_index_builder.build_blending_indices``. For a phase with fixed
  weights this is megatron-core's ``helpers_cpp.build_blending_indices`` bit for bit; every
  language's count stays within one sample of its (cumulative, piecewise-constant) target at every
  prefix of the phase, and languages with weight 0 never appear. Deficits restart at each phase.
* per phase and language: the packed rows (``_index_builder.pack_rows``). Each language is an
  endless stream of epochs, epoch ``e`` being its documents (all shards, shard order) shuffled by
  ``permutation(D, seed, stream=hash(language), epoch=e)`` (numpy's ``Generator(PCG64)
  .permutation`` bit for bit, for the documented seeding), cut into rows of the phase's
  ``seq_len``. Phases continue each language's stream where the previous phase stopped, so no
  document repeats before an epoch is used up. A row is ``sample_idx[r] .. sample_idx[r + 1]``
  over ``doc_index`` (megatron GPT ``build_sample_idx`` convention). This is ``packing="concat"``.
* ``packing="best_fit"`` (mmBERT / ModernBERT / Ettin's ``GreedyBestFitSequencePacker``,
  github.com/AnswerDotAI/ModernBERT ``src/sequence_packer.py``): the same document stream, but each
  document's content (its tokens without the shard's own ``<bos>`` / ``<eos>``) is cut every
  ``seq_len - 2`` tokens into pieces framed ``<bos> ... <eos>`` as the reference frames every
  sequence (the shard's own ``<bos>`` / ``<eos>`` are kept where a piece has them, the missing ones
  added by the reader; non-first pieces with fewer than :data:`BEST_FIT_MIN_PIECE` content tokens
  are dropped), and whole pieces are best-fit packed into *packed rows* of ``bin_rows x seq_len``
  tokens (``_index_builder.pack_best_fit``: :data:`BEST_FIT_WINDOW_ROWS` packed rows open at a
  time, up to :data:`BEST_FIT_BUFFER` pieces deferred per window, reading ahead at most
  :data:`BEST_FIT_LOOKAHEAD_ROWS` ``seq_len`` rows' worth of deferred tokens plus half the room of
  the packed rows after the window). ``bin_rows`` is the
  phase's micro-batch size (``data.packed_row: micro_batch``, the reference's geometry: one packed
  row is one micro-batch, a piece may continue from one ``seq_len`` row of it into the next) or 1
  (``data.packed_row: seq_len``: pieces never cross rows, for attention that works row by row).
  Room no piece fills is padding, at the end of the packed row. Packed row ``b`` is
  ``pieces[row_ptr[b] .. row_ptr[b + 1]]``, each piece ``(document, offset, stored tokens)`` plus
  ``piece_flags`` (1: a ``<bos>`` is prepended, 2: an ``<eos>`` appended); sample rows
  ``b x bin_rows .. + bin_rows - 1`` of the language are its ``seq_len`` slices. The blending then
  draws whole packed rows: a language's ``bin_rows`` rows are consecutive samples, aligned to
  ``bin_rows``, so every micro-batch is one packed row. The stream advances by the documents the
  packer took (pieces still waiting for a row when the phase's rows are done are dropped), so every
  phase, and every branch starting at one, begins on a document boundary with nothing pending.

Branches. ``start_phase=k`` (a run that starts at phase ``k``, e.g. a decay variant starting from
its parent's ``phase_end_mid``) plans and blends every phase but packs and stores only phases
``k..``: each language's stream starts at the token where the full schedule would be at phase ``k``
(``first_token``), and sample numbers (the masking RNG counters) keep their offsets, so a branch
that keeps its parent's phase list reads its parent's rows for the phases they share.

The plan. :func:`index_plan` describes the index as JSON (``index_plan.json`` in the cache folder):
per phase its samples, ``packing`` (mode and, over the built rows, ``pad_fraction``,
``fragment_token_fraction``: tokens in pieces that are not a whole document, and
``bos_start_fraction``: segments starting with ``<bos>``) and, per language, ``rows``, ``tokens``
(stream tokens the phase consumed: ``rows x seq_len`` for concat, the documents taken for
best_fit), ``first_token`` (the language's stream position where the phase starts) and ``epochs`` (passes over the language's tokens by the
end of the phase, cumulative over the schedule); :func:`format_index_plan` prints it. Training
checkpoints carry a phase's end positions so a branch can be checked against its parent.

Caching: the arrays are ``.npy`` files in ``{cache_dir}/mmbert-index-{key}/`` where ``key`` hashes
everything they depend on (manifest content including the tokenizer hash and each shard's index
size, phases, seed, default global batch size, annealing resolution, builder version). One rank
builds (global rank 0 by default) into a temporary folder renamed into place when complete; the
others poll for it and give up after ``timeout`` seconds with a message naming the folder and the
command that prebuilds it (``tools/build_data_index.py``).

Memory: :func:`build_arrays` streams each array into its ``.npy`` file in blocks (the blending of a
phase and the packing of a language's phase both resumable, ``_index_builder.PhaseBlender`` /
``RowPacker`` / ``BestFitPacker``), languages on ``threads`` threads, so what the build holds does not
grow with the schedule; see docs/data.md "Cache".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import to_dict
from megatron_mmbert.data.schedule import PhasePlan, plan_schedule

INDEX_VERSION = 4
"""Bumped whenever the builder's output for the same inputs changes (part of the cache key)."""

PACKING_MODES = ("concat", "best_fit")
"""``data.packing`` values (see the module docstring)."""
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


def _ext():
    try:
        from megatron_mmbert.data import _index_builder
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(
            "the C++ index builder megatron_mmbert.data._index_builder is not built; run "
            "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`) "
            f"in the repository root ({e})"
        ) from e
    return _index_builder


def _check(name: str, arr, dtype, ndim: int) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of {np.dtype(dtype).name}, got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {arr.dtype} (use .astype)")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def build_blending_indices(
    weights: np.ndarray,
    segment_sizes: np.ndarray,
    segment_phase: Optional[np.ndarray] = None,
    algorithm: str = "fast",
):
    """Blend by segments: ``weights`` float64 [K, L], ``segment_sizes`` int64 [K],
    ``segment_phase`` int64 [K] (default: one phase). Returns ``(dataset_index, dataset_sample_index,
    counts [phases, L])``. ``algorithm="scan"`` is the O(N x L) reference loop."""
    weights = _check("weights", weights, np.float64, 2)
    segment_sizes = _check("segment_sizes", segment_sizes, np.int64, 1)
    if segment_phase is None:
        segment_phase = np.zeros(len(segment_sizes), dtype=np.int64)
    segment_phase = _check("segment_phase", segment_phase, np.int64, 1)
    di, dsi, counts, _ = _ext().build_blending_indices(weights, segment_sizes, segment_phase, algorithm)
    return di, dsi, counts


def language_stream(name: str) -> int:
    """The shuffle stream id of a language: stable across manifests (sha256 of its name)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def pack_rows(sizes: np.ndarray, seq_len: int, num_rows: int, start_token: int, seed: int, stream: int):
    """Packed rows of one language: ``(doc_index int32, sample_idx int64 [rows + 1, 2], first_epoch)``."""
    sizes = _check("sizes", sizes, np.int32, 1)
    return _ext().pack_rows(sizes, int(seq_len), int(num_rows), int(start_token), int(seed), int(stream))


def pack_best_fit(sizes: np.ndarray, framing: np.ndarray, seq_len: int, num_rows: int, start_token: int,
                  seed: int, stream: int, bin_rows: int = 1, window: int = BEST_FIT_WINDOW_ROWS,
                  buffer: int = BEST_FIT_BUFFER, lookahead: int = BEST_FIT_LOOKAHEAD_ROWS,
                  min_piece: int = BEST_FIT_MIN_PIECE):
    """``num_rows`` best-fit packed rows of ``bin_rows x seq_len`` tokens of one language: ``(pieces
    int32 [P, 3], piece_flags int8 [P], row_ptr int64 [num_rows + 1], end_token, stats)``.
    ``framing`` (int8 [D], :func:`framing_flags`): 1 where a stored document starts with ``<bos>``,
    2 where it ends with ``<eos>``; ``start_token`` must be a document boundary of the stream."""
    sizes = _check("sizes", sizes, np.int32, 1)
    framing = _check("framing", framing, np.int8, 1)
    return _ext().pack_best_fit(sizes, framing, int(seq_len), int(num_rows), int(start_token), int(seed),
                                int(stream), int(bin_rows), int(window), int(buffer), int(lookahead),
                                int(min_piece))


FIRST_TOKEN_WINDOW = 8 << 20
"""Bytes of a ``.bin`` mapped at a time while reading documents' first / last tokens: the pages a read
touches count in the RSS while mapped, one window per language on a thread (16 threads: 128 MB; 64 MB
windows made two threads' peak grow 1.2x with the corpus, and cost no less time)."""


DOCUMENT_CHUNK = 1 << 16
"""Documents of a shard read at a time (their lengths and first tokens): the temporaries stay a
few MB whatever the shard's size, beside the int32 / int8 per-document results."""


def _document_chunks(prefixes: Sequence[str]):
    """``(prefix, IndexedDataset, document_indices[a : b + 1] as int64)`` over every shard, at most
    :data:`DOCUMENT_CHUNK` documents at a time (megatron-core reads the ``.idx``). Each chunk opens
    the shard afresh: megatron-core maps the whole ``.idx`` and the pages a read touches count in the
    RSS until the mapping closes (~20 bytes a document: 95 MB for eng_Latn at 1/100 of FineWeb2)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        n = len(ds.document_indices) - 1
        del ds
        for a in range(0, max(n, 0), DOCUMENT_CHUNK):
            ds = IndexedDataset(prefix)
            docs = np.asarray(ds.document_indices[a:min(a + DOCUMENT_CHUNK, n) + 1], dtype=np.int64)
            yield prefix, ds, docs
            del ds


def _count_documents(prefixes: Sequence[str]) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return sum(max(len(IndexedDataset(p).document_indices) - 1, 0) for p in prefixes)


def _first_tokens(prefix: str, ds, docs: np.ndarray) -> np.ndarray:
    """int64: the first stored token of documents starting at sequences ``docs`` (-1: empty)."""
    nonempty = np.asarray(ds.sequence_lengths[docs]) > 0 if len(docs) else np.zeros(0, bool)
    pointers = np.asarray(ds.index.sequence_pointers[docs[nonempty]], dtype=np.int64) if nonempty.any() else None
    return _tokens_at(prefix, ds, nonempty, pointers)


def _last_tokens(prefix: str, ds, docs: np.ndarray) -> np.ndarray:
    """int64: the last stored token of the documents of ``docs`` (``document_indices[a : b + 1]``; -1
    where a document's last sequence is empty)."""
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
        ext = _ext()
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


def document_lengths(prefixes: Sequence[str]) -> np.ndarray:
    """int32 [D]: tokens per document over a language's shards, in shard order (megatron-core's
    ``IndexedDataset`` reads the ``.idx``; a document is its consecutive sequences)."""
    lengths = np.empty(_count_documents(prefixes), dtype=np.int32)
    at = 0
    for _, ds, docs in _document_chunks(prefixes):
        seq = np.asarray(ds.sequence_lengths[docs[0]:docs[-1]], dtype=np.int64)
        ends = np.concatenate([[0], np.cumsum(seq)])
        part = ends[docs[1:] - docs[0]] - ends[docs[:-1] - docs[0]]
        if part.size and part.max() > np.iinfo(np.int32).max:
            raise ValueError(f"a document in {prefixes} is longer than 2^31 tokens")
        lengths[at:at + len(part)] = part
        at += len(part)
    return lengths


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
    """:func:`index_plan` of this index (also ``index_plan.json`` in ``path``)."""


def manifest_digest(manifest) -> str:
    """sha256 of a manifest's content (languages, shards, token counts, tokenizer)."""
    return hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()


def source_digests(manifest) -> Dict[str, str]:
    """:func:`manifest_digest` of each source of a merged manifest (``data.shards.phase_sources``):
    ``""`` the run's ``data.manifest``, else a phase manifest's source id."""
    from megatron_mmbert.data.shards import split_sources

    return {sid: manifest_digest(m) for sid, m in split_sources(manifest).items()}


def cache_key(manifest, phases: Sequence[PhaseConfig], seed: int, default_global_batch_size, anneal_segments,
              start_phase: int = 0, packing: str = "concat", bin_rows: Optional[Sequence[int]] = None) -> str:
    """sha256 over everything the index arrays depend on."""
    shards = {}
    for lang, entry in manifest.languages.items():
        shards[lang] = [os.path.getsize(p + ".idx") if os.path.exists(p + ".idx") else -1 for p in entry.shards]
    desc = {
        "index_version": INDEX_VERSION,
        "manifest": manifest.to_json(),
        "idx_sizes": shards,
        "phases": [to_dict(p) for p in phases],
        "seed": int(seed),
        "default_global_batch_size": default_global_batch_size,
        "anneal_segments": int(anneal_segments),
        "start_phase": int(start_phase),
        "packing_mode": packing,
    }
    if packing != "concat":  # rows depend on the packer's constants too
        desc["packing"] = {"mode": packing, "min_piece": BEST_FIT_MIN_PIECE, "window_rows": BEST_FIT_WINDOW_ROWS,
                           "buffer": BEST_FIT_BUFFER, "lookahead_rows": BEST_FIT_LOOKAHEAD_ROWS,
                           "bin_rows": [int(g) for g in bin_rows] if bin_rows else None}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _progress(msg: str) -> None:
    print(f"[build_data_index] {msg}", file=sys.stderr, flush=True)


def stream_positions(plans: List[PhasePlan], counts: np.ndarray) -> np.ndarray:
    """int64 [phases + 1, L]: each language's stream position (tokens) at the start of every phase
    and, last, at the end of the schedule, from the realised sample ``counts`` [phases, L]."""
    seq = np.array([p.phase.seq_len for p in plans], dtype=np.int64)
    used = np.asarray(counts, dtype=np.int64) * seq[:, None]
    return np.concatenate([np.zeros((1, used.shape[1]), np.int64), np.cumsum(used, axis=0)])


PACKING_STATS = ("row_tokens", "pad_tokens", "fragment_tokens", "segments", "bos_segments",
                 "dropped_short_tokens", "dropped_pending_tokens", "eos_segments")
"""Columns of ``phase{k}_packing_stats`` (int64 [L, 8]); dropped tokens are 0 for concat."""


def _check_packing(packing: str) -> None:
    if packing not in PACKING_MODES:
        raise ValueError(f"data.packing must be one of {PACKING_MODES}, got {packing!r}")


def framing_flags(manifest, lang: str, pool=None) -> np.ndarray:
    """int8 [D]: per document of ``lang``, 1 when it starts with the tokenizer's ``<bos>`` in the shards,
    plus 2 when it ends with its ``<eos>`` (``FRAMING_BOS`` / ``FRAMING_EOS``). ``pool`` (an executor):
    its chunks of :data:`DOCUMENT_CHUNK` documents are read there, a few at a time (the read releases
    the GIL), so one large language's scan is spread over the threads."""
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
            while len(jobs) >= 2 * pool._max_workers:
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


FRAMING_BOS, FRAMING_EOS = 1, 2
"""Bits of :func:`framing_flags` (what a stored document holds) and of ``piece_flags`` (what the
reader adds to a piece: ``<bos>`` before, ``<eos>`` after)."""


ARRAY_NAMES = ("dataset_index", "dataset_sample_index", "counts", "doc_index", "doc_offsets", "sample_idx",
               "row_offsets", "pieces", "piece_flags", "piece_offsets", "row_ptr", "packing_stats")
"""The ``phase{k}_*`` arrays of the cache (plus ``stream_positions``)."""


class NpyAppender:
    """A ``.npy`` file written chunk by chunk along its first axis, so that an array of the index is
    never whole in memory; the header is written last. ``dtype`` is where the values start; with
    ``wide`` (an int dtype) a chunk whose values do not fit ``dtype`` rewrites what was written as
    ``wide`` and continues in it (the narrowest dtype the values allow, checked, not assumed)."""

    HEADER_BYTES = 128
    """The header's size: numpy pads a version 1.0 header to 64-byte multiples and the one of any
    1-D or [N, k] array of up to 10^20 elements takes 128 bytes (checked when it is written)."""

    def __init__(self, path: str, dtype, row_shape=(), wide=None):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.wide = None if wide is None else np.dtype(wide)
        self.rows = 0
        self._f = open(path, "wb")
        self._f.write(b"\0" * self.HEADER_BYTES)

    def append(self, chunk) -> None:
        chunk = np.asarray(chunk)
        if chunk.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: chunk of shape {chunk.shape}, rows of shape {self.row_shape}")
        if chunk.size and self.dtype.kind in "iu" and chunk.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            if chunk.min() < info.min or chunk.max() > info.max:
                if self.wide is None or self.wide == self.dtype:
                    raise OverflowError(f"{self.path}: values up to {chunk.max()} do not fit {self.dtype}")
                self._widen()
        np.ascontiguousarray(chunk, dtype=self.dtype).tofile(self._f)
        self.rows += len(chunk)

    def append_file(self, path: str, rows: int) -> None:
        """Append ``rows`` rows stored raw in this appender's dtype in file ``path``, copied by the kernel
        (``os.copy_file_range``; a buffered copy where it is missing), not through memory."""
        size = os.path.getsize(path)
        if size != rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes are not {rows} rows of {self.row_shape} {self.dtype}")
        self._f.flush()
        with open(path, "rb") as src:
            done = 0
            try:
                while done < size:
                    n = os.copy_file_range(src.fileno(), self._f.fileno(), size - done)
                    if n == 0:
                        raise OSError("copy_file_range made no progress")
                    done += n
            except (AttributeError, OSError):  # not Linux, or a file system that refuses it
                src.seek(done)
                os.lseek(self._f.fileno(), 0, os.SEEK_END)
                shutil.copyfileobj(src, self._f, 1 << 20)
                self._f.flush()
        self._f.seek(0, os.SEEK_END)
        self.rows += rows

    def _widen(self) -> None:
        """Rewrite what was written as ``self.wide`` (block by block) and continue in it."""
        self._f.close()
        old = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.HEADER_BYTES,
                        shape=(self.rows,) + self.row_shape) if self.rows else None
        tmp = self.path + ".widen"
        with open(tmp, "wb") as f:
            f.write(b"\0" * self.HEADER_BYTES)
            for a in range(0, self.rows, 1 << 22):
                np.ascontiguousarray(old[a:a + (1 << 22)], dtype=self.wide).tofile(f)
        del old
        os.replace(tmp, self.path)
        self.dtype = self.wide
        self._f = open(self.path, "r+b")
        self._f.seek(0, os.SEEK_END)

    def close(self) -> None:
        import io

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.rows,) + self.row_shape})
        if len(header.getvalue()) != self.HEADER_BYTES:  # pragma: no cover - shapes beyond 10^20
            raise ValueError(f"{self.path}: a .npy header of {len(header.getvalue())} bytes, not {self.HEADER_BYTES}")
        self._f.seek(0)
        self._f.write(header.getvalue())
        self._f.close()


BLEND_CHUNK = 1 << 18
"""Samples of ``dataset_index`` turned into ``dataset_sample_index`` and written at a time."""


def _occurrence_numbers(chunk: np.ndarray, seen: np.ndarray, dtype) -> np.ndarray:
    """``dataset_sample_index`` of a chunk of ``dataset_index``: for each sample, how many earlier
    samples of the phase came from its language (``seen``: those before the chunk, updated)."""
    order = np.argsort(chunk, kind="stable")  # each language's samples, in order
    lang = chunk[order].astype(np.int64)
    n = np.bincount(lang, minlength=len(seen))
    first = np.concatenate([[0], np.cumsum(n)[:-1]])  # where each language's run starts in `order`
    out = np.empty(len(chunk), dtype=dtype)
    out[order] = seen[lang] + np.arange(len(chunk)) - first[lang]
    seen += n
    return out


def _int_dtype(max_value: int, narrow=np.int32, wide=np.int64) -> np.dtype:
    """``narrow`` when every value up to ``max_value`` fits it, else ``wide``."""
    return np.dtype(narrow) if max_value <= np.iinfo(narrow).max else np.dtype(wide)


PACK_BLOCK_TOKENS = 1 << 26
"""Row tokens a packer makes per block (best_fit: whole windows of packed rows, at least one): each
block is written out as it is made, so a language's phase is never whole in memory."""


THREAD_DOCUMENT_BUDGET = 1 << 30
"""Documents of the languages packed (or waiting) on threads at once: each holds ~9 bytes a document
(lengths, framing flags, an epoch's permutation), so at most ~9 GiB whatever the thread count; a
language larger than this runs alone."""


def default_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def _check_best_fit_tokenizer(manifest) -> None:
    ids = manifest.tokenizer.special_ids
    missing = [role for role in ("bos", "eos") if ids.get(role) is None]
    if missing:
        raise ValueError(f"data.packing: best_fit frames every sequence <bos> ... <eos>, but tokenizer "
                         f"{manifest.tokenizer.name!r} has no {' or '.join(missing)}; use data.packing: concat")


def _blend_phase(ext, plan: PhasePlan, k: int, g: int, keep: bool, path) -> np.ndarray:
    """Blend phase ``k`` block by block (``_index_builder.PhaseBlender``: :data:`BLEND_CHUNK` samples at
    a time, the same values as one call over the phase), writing ``dataset_index`` and
    ``dataset_sample_index`` as they come when ``keep``; returns the counts per language (int64 [L])."""
    t0 = time.time()
    weights = np.ascontiguousarray(plan.segment_weights, dtype=np.float64)
    sizes = np.asarray(plan.segment_sizes, dtype=np.int64)
    if g > 1:  # blend packed rows of g rows: the segment boundaries in whole groups
        ends = np.cumsum(sizes) // g
        sizes = np.diff(np.concatenate([[0], ends])).astype(np.int64)
    if not hasattr(ext, "PhaseBlender"):  # an extension built from older csrc/
        raise ImportError(f"the C++ index builder {ext.__file__} is older than csrc/ (no PhaseBlender); rebuild "
                          "it: `python setup.py build_ext --inplace` in the repository root")
    total = int(sizes.sum()) * g
    # Samples per language are known only at the end: dataset_sample_index starts int32 and widens
    # (rewriting what was written) only if a language passes 2^31 rows in the phase.
    d_out = s_out = None
    blender = ext.PhaseBlender(weights, sizes)
    seen = np.zeros(weights.shape[1], dtype=np.int64)  # samples of each language before the block
    while blender.remaining:
        di = blender.next(max(BLEND_CHUNK // g, 1))
        if g > 1:  # every group is g consecutive rows of its language
            di = np.repeat(di, g)
        if d_out is None:
            d_out = NpyAppender(path(f"phase{k}_dataset_index"), di.dtype)
            s_out = NpyAppender(path(f"phase{k}_dataset_sample_index"), np.int32, wide=np.int64)
        if keep:
            d_out.append(di)
            s_out.append(_occurrence_numbers(di, seen, np.int64))
    if d_out is None:  # an empty phase
        dtype = np.int16 if weights.shape[1] <= np.iinfo(np.int16).max else np.int32
        d_out = NpyAppender(path(f"phase{k}_dataset_index"), dtype)
        s_out = NpyAppender(path(f"phase{k}_dataset_sample_index"), np.int32, wide=np.int64)
    d_out.close()
    s_out.close()
    counts = blender.counts() * g
    _progress(f"phase {k}: blended {total:,} samples over {weights.shape[1]} languages in {time.time() - t0:.1f}s")
    return counts


class _PhaseFiles:
    """The phase files of the packed rows (:class:`NpyAppender` each); one language's blocks go
    straight in (``append``) or, built on another thread, through its :class:`_SpillFiles`."""

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


class _SpillFiles:
    """One language's blocks, built on a worker thread, kept in raw files of its own folder until the
    main thread copies them into the phase files in language order (:meth:`copy_into`)."""

    COPY_ROWS = 1 << 20

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder)
        self.files = {}  # (phase, name) -> [file, dtype, row shape, rows]

    def append(self, k: int, name: str, chunk) -> None:
        chunk = np.ascontiguousarray(chunk)
        if (k, name) not in self.files:
            self.files[(k, name)] = [open(os.path.join(self.folder, f"{k}_{name}"), "wb"), chunk.dtype,
                                     chunk.shape[1:], 0]
        entry = self.files[(k, name)]
        chunk.astype(entry[1], copy=False).tofile(entry[0])
        entry[3] += len(chunk)

    def close(self) -> None:
        for entry in self.files.values():
            entry[0].close()

    def copy_into(self, files: _PhaseFiles) -> None:
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
        shutil.rmtree(self.folder)


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


def _pack_best_fit(ext, lengths, framing, plan: PhasePlan, packed_rows: int, g: int, start: int, seed: int,
                   lang: str, k: int, sink) -> "tuple[np.ndarray, int, int, int]":
    """Phase ``k``'s best_fit packed rows of one language in blocks of whole windows
    (``_index_builder.BestFitPacker``), written to ``sink`` (None: counted, not stored); returns (stats
    [8], end_token, pieces written, row_ptr entries written)."""
    packer = ext.BestFitPacker(lengths, framing, plan.phase.seq_len, packed_rows, start, int(seed),
                               language_stream(lang), g, BEST_FIT_WINDOW_ROWS, BEST_FIT_BUFFER,
                               BEST_FIT_LOOKAHEAD_ROWS, BEST_FIT_MIN_PIECE)
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


_EMPTY = {"rows": np.zeros((1, 2), np.int64), "ptr": np.zeros(1, np.int64)}
"""A language-phase without rows: one ``sample_idx`` entry and one ``row_ptr`` entry (both packings)."""


def _pack_language(ext, manifest, lang: str, plans: List[PhasePlan], counts: np.ndarray, concat_starts: np.ndarray,
                   seed: int, start_phase: int, packing: str, groups: Sequence[int], sink, framing_pool=None) -> Dict:
    """Every phase of one language (``counts``: its rows per phase), written to ``sink``: returns its
    ``stats`` [K, 8], stream ``positions`` [K + 1] (best_fit; concat's are ``concat_starts``) and per
    phase the entries written (``docs``, ``rows``, ``pieces``)."""
    K = len(plans)
    # Framing first: its read maps up to FIRST_TOKEN_WINDOW bytes of the .bin, better without the lengths
    # (4 bytes a document) already held beside it.
    framing = framing_flags(manifest, lang, framing_pool)
    lengths = document_lengths(manifest.languages[lang].shards)
    res = {"stats": np.zeros((K, len(PACKING_STATS)), np.int64), "positions": np.zeros(K + 1, np.int64),
           "docs": [0] * K, "rows": [0] * K, "pieces": [0] * K}
    pos = 0
    for k, plan in enumerate(plans):
        rows, keep = int(counts[k]), k >= start_phase
        # The other packing's array gets its empty entry (as every language of every phase does).
        sink.append(k, "rows" if packing == "best_fit" else "ptr", _EMPTY["rows" if packing == "best_fit" else "ptr"])
        if packing == "best_fit":
            res["positions"][k] = pos
            if rows:
                res["stats"][k], pos, res["pieces"][k], res["rows"][k] = _pack_best_fit(
                    ext, lengths, framing, plan, rows // groups[k], groups[k], pos, seed, lang, k,
                    sink if keep else None)
            if not (rows and keep):  # an empty phase of this language: row_ptr [0]
                sink.append(k, "ptr", _EMPTY["ptr"])
                res["rows"][k] = 1
        elif rows and keep:
            res["stats"][k], res["docs"][k], res["rows"][k] = _pack_concat(
                ext, lengths, framing, plan, rows, int(concat_starts[k]), seed, lang, k, sink)
        else:
            sink.append(k, "rows", _EMPTY["rows"])
            res["rows"][k] = 1
    res["positions"][K] = pos
    return res


def build_arrays(manifest, plans: List[PhasePlan], seed: int, out_dir: str, start_phase: int = 0,
                 packing: str = "concat", bin_rows: Optional[Sequence[int]] = None,
                 threads: int = 1) -> Dict[str, np.ndarray]:
    """Build every array of the schedule into ``out_dir/{name}.npy`` (names as in the cache) and
    return the small ones (``phase{k}_counts``, ``phase{k}_packing_stats``, ``stream_positions``).
    Phases before ``start_phase`` only contribute their sample counts (and so the stream positions;
    best_fit packs them to know where their streams end, without storing the rows).

    Memory flat in the run's length: the blending runs phase by phase in blocks of
    :data:`BLEND_CHUNK` samples (``_index_builder.PhaseBlender``), the packing language by language in
    blocks of :data:`PACK_BLOCK_TOKENS` row tokens (``RowPacker`` / ``BestFitPacker``: resumable, the
    same rows as one call), each block appended to its file (:class:`NpyAppender`) and dropped. What
    remains is per language and independent of the schedule: its document lengths and framing flags
    (5 bytes a document) and one epoch's permutation (4 bytes a document). Arrays that can outgrow
    int32 (``dataset_sample_index``, ``sample_idx``, ``row_ptr``) are int32 when their values fit
    (checked) and int64 otherwise; readers take either.

    ``threads``: languages packed at once (the C++ packers release the GIL); the output does not
    depend on it. With more than one, languages start longest first (:func:`language_schedule`), at
    most ``2 x threads`` and :data:`THREAD_DOCUMENT_BUDGET` documents submitted at once, and each
    language's blocks wait in a spill folder of ``out_dir`` until the languages before it are written
    (on disk: at worst the rest of the index once more, while the longest language packs).

    ``bin_rows`` (best_fit): ``seq_len`` rows per packed row, one per phase (default 1); the phase's
    samples are blended in groups of that many rows (:func:`check_bin_rows`)."""
    _check_packing(packing)
    if packing == "best_fit":
        _check_best_fit_tokenizer(manifest)
    ext = _ext()
    languages = plans[0].languages
    K = len(plans)
    groups = check_bin_rows(plans, bin_rows if packing == "best_fit" else None)
    path = lambda name: os.path.join(out_dir, name + ".npy")  # noqa: E731
    counts = np.zeros((K, len(languages)), dtype=np.int64)
    # Blending, phase by phase (deficits restart at each phase, and a phase's sample numbers count
    # from its own first row of each language: the same arrays as one schedule-wide call).
    for k, plan in enumerate(plans):
        counts[k] = _blend_phase(ext, plan, k, groups[k], k >= start_phase, path)
        np.save(path(f"phase{k}_counts"), counts[k])
    # concat: positions are rows x seq_len; best_fit: filled in below from what the packer took.
    positions = stream_positions(plans, counts)
    stats = _pack_languages(ext, manifest, plans, counts, positions, seed, start_phase, packing, groups, path,
                            max(int(threads), 1), out_dir)
    small = {"stream_positions": positions}
    np.save(path("stream_positions"), positions)
    for k in range(K):
        np.save(path(f"phase{k}_packing_stats"), stats[k])
        small[f"phase{k}_counts"] = counts[k]
        small[f"phase{k}_packing_stats"] = stats[k]
    return small


LANGUAGE_DOCUMENT_COST = 256
"""Row tokens a document's own work (its length, framing read and permutation entry) counts for when
:func:`language_schedule` ranks languages: an estimate; the order needs only the largest first."""


def language_schedule(plans: List[PhasePlan], counts: np.ndarray, documents: Sequence[int], active) -> List[int]:
    """The order the languages start on threads: longest first (LPT), so that the largest language,
    whose phases are one sequential chain and the build's critical path, starts at once and not
    when the languages before it in the index are written. A language's work: the row tokens of its
    phases (``counts`` x ``seq_len``, every phase: best_fit packs the ones before the start phase
    too) plus :data:`LANGUAGE_DOCUMENT_COST` per document. Ties in language order."""
    seq = np.array([p.phase.seq_len for p in plans], np.int64)[:, None]
    work = (counts * seq).sum(axis=0) + LANGUAGE_DOCUMENT_COST * np.asarray(documents, np.int64)
    return sorted((i for i in range(len(work)) if active[i]), key=lambda i: (-int(work[i]), i))


def _pack_languages(ext, manifest, plans, counts, positions, seed, start_phase, packing, groups, path,
                    threads: int, out_dir: str) -> np.ndarray:
    """Pack every language in order into the phase files (``threads`` at once), fill best_fit's
    ``positions`` and write the offset arrays; returns the packing stats [K, L, 8]."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    languages = plans[0].languages
    K, L = len(plans), len(languages)
    active = counts.sum(axis=0) > 0 if packing == "best_fit" else counts[start_phase:].sum(axis=0) > 0
    need = [i for i in range(L) if active[i]]
    files = _PhaseFiles(path, K)
    offsets = {name: np.zeros((K, L + 1), np.int64) for name in ("docs", "rows", "pieces")}
    stats = np.zeros((K, L, len(PACKING_STATS)), np.int64)
    docs = [int(manifest.languages[lang].documents) for lang in languages]

    def task(i, sink):
        return _pack_language(ext, manifest, languages[i], plans, counts[:, i], positions[:, i], seed, start_phase,
                              packing, groups, sink, framing_pool)

    def spilled(i):
        sink = _SpillFiles(os.path.join(out_dir, f".spill-{i}"))
        try:
            return task(i, sink), sink
        finally:
            sink.close()

    t0, done = time.time(), 0
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    # The framing scans' chunks, of every language, on threads of their own: the largest language's
    # scan (the critical path's longest part) is spread over them; its packer thread waits meanwhile.
    framing_pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        order, at = language_schedule(plans, counts, docs, active), 0  # threads: the order languages start in
        futures, running = {}, {}  # language -> future; submitted and not finished -> its documents
        for i in range(L):
            if not active[i]:  # no rows anywhere: the empty entries, lengths not even read
                for k in range(K):
                    files.append(k, "rows", _EMPTY["rows"])
                    files.append(k, "ptr", _EMPTY["ptr"])
                offsets["rows"][:, i + 1] = 1
                continue
            if pool is not None:  # start languages longest first, written in language order
                while not (i in futures and futures[i].done()):
                    while at < len(order) and len(running) < 2 * threads and (
                            not running or sum(running.values()) + docs[order[at]] <= THREAD_DOCUMENT_BUDGET):
                        futures[order[at]] = pool.submit(spilled, order[at])
                        running[order[at]] = docs[order[at]]
                        at += 1
                    wait([futures[j] for j in running], return_when=FIRST_COMPLETED)
                    for j in [j for j in running if futures[j].done()]:
                        del running[j]
                        if futures[j].exception() is not None:  # fail now, not when its turn comes
                            futures[j].result()
                running.pop(i, None)
                res, sink = futures.pop(i).result()
                sink.copy_into(files)
            else:
                res = task(i, files)
            _record_language(i, res, positions, stats, offsets, packing)
            done += 1
            if done % 100 == 0 or done == len(need):
                rate = done / max(time.time() - t0, 1e-9)
                _progress(f"packed {done}/{len(need)} languages ({rate:.1f}/s, ETA {(len(need) - done) / rate:.0f}s)")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
            framing_pool.shutdown(cancel_futures=True)
    files.close()
    for name, key in (("doc_offsets", "docs"), ("row_offsets", "rows"), ("piece_offsets", "pieces")):
        for k in range(K):
            np.save(path(f"phase{k}_{name}"), np.cumsum(offsets[key][k]))
    return stats


def _record_language(i, res, positions, stats, offsets, packing) -> None:
    """Language ``i``'s results (:func:`_pack_language`) into the schedule's tables."""
    stats[:, i] = res["stats"]
    if packing == "best_fit":
        positions[:, i] = res["positions"]
    for key in ("docs", "rows", "pieces"):
        offsets[key][:, i + 1] = res[key]
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


def _assemble(plans: List[PhasePlan], arrays, path: str, plan_json: Dict, start_phase: int,
              packing: str = "concat", bin_rows: Optional[Sequence[int]] = None) -> DataIndex:
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


def phase_epochs(plan: Dict, phase: str) -> Dict[str, Dict[str, float]]:
    """Per language drawn in ``phase``: ``in_phase`` (passes over its tokens within the phase: what
    ``max_epochs_per_language`` caps) and ``cumulative`` (passes by the phase's end), from the plan."""
    p = next((q for q in plan["phases"] if q["name"] == phase), None)
    if p is None:
        raise KeyError(f"phase {phase!r} is not in the index plan")
    totals = plan["language_tokens"]
    return {
        lang: {"in_phase": round(r["tokens"] / totals[lang], 6), "cumulative": r["epochs"]}
        for lang, r in p["languages"].items() if r["rows"] > 0
    }


def phase_end_positions(plan: Dict, phase: str) -> Dict[str, int]:
    """Each language's stream position at the end of ``phase`` (the next phase's ``first_token``)."""
    for p in plan["phases"]:
        if p["name"] == phase:
            return {lang: r["first_token"] + r["tokens"] for lang, r in p["languages"].items()}
    raise KeyError(f"phase {phase!r} is not in the index plan ({[p['name'] for p in plan['phases']]})")


def format_index_plan(plan: Dict, warn_epochs: float = 5.0, head: int = 15, tail: int = 5,
                      phases: Optional[Sequence[str]] = None) -> str:
    """The plan as text, one table per phase: the languages with rows (largest first; top/bottom
    rows when long) with rows, tokens, share, first_token and cumulative epochs, and a summary."""
    from megatron_mmbert.data.schedule import _fmt_tokens

    out = []
    for p in plan["phases"]:
        if phases is not None and p["name"] not in phases:
            continue
        active = [(lang, r) for lang, r in p["languages"].items() if r["rows"] > 0]
        active.sort(key=lambda x: (-x[1]["rows"], x[0]))
        total = max(sum(r["rows"] for _, r in active), 1)
        state = "" if p["built"] else " (before this run's start phase: planned, not built)"
        out.append(f"phase {p['index']} {p['name']!r}: {p['samples']:,} rows x {p['seq_len']} tokens, "
                   f"{len(active)} languages, samples from #{p['first_sample']:,}{state}")
        pk = p.get("packing") or {}
        geometry = ""
        if pk.get("rows_per_packed_row"):
            geometry = (f" (packed rows of {pk['rows_per_packed_row']} x {p['seq_len']} = "
                        f"{pk['packed_row_tokens']:,} tokens)")
        if pk.get("pad_fraction") is not None:
            out.append(f"  packing {pk['mode']}: padding {100 * pk['pad_fraction']:.{3 if geometry else 2}f}% of row tokens{geometry}, "
                       f"{100 * pk['fragment_token_fraction']:.2f}% of tokens in document fragments, "
                       f"{100 * pk['bos_start_fraction']:.2f}% of segments start with <bos>"
                       + (f", {100 * pk['eos_end_fraction']:.2f}% end with <eos>" if "eos_end_fraction" in pk else ""))
        elif pk:
            out.append(f"  packing {pk['mode']}{geometry}")
        out.append(f"  {'language':<16} {'rows':>12} {'tokens':>10} {'share %':>9} {'first_token':>14} {'epochs':>9}")

        def line(lang, r):
            flag = "  !" if r["epochs"] > warn_epochs else ""
            return (f"  {lang:<16} {r['rows']:>12,} {_fmt_tokens(r['tokens']):>10} {100 * r['rows'] / total:>9.4f} "
                    f"{r['first_token']:>14,} {r['epochs']:>9.3f}{flag}")

        shown = active if len(active) <= head + tail + 1 else active[:head] + [None] + active[-tail:]
        for item in shown:
            out.append(f"  ... {len(active) - head - tail} more languages ..." if item is None else line(*item))
        if active:
            e = sorted(r["epochs"] for _, r in active)
            worst = max(active, key=lambda x: x[1]["epochs"])
            out.append(f"  epochs by the end of the phase: min {e[0]:.3g} / median {e[len(e) // 2]:.3g} / "
                       f"max {e[-1]:.3g} ({worst[0]})")
            within = phase_epochs(plan, p["name"])
            most = max(within, key=lambda lang: (within[lang]["in_phase"], lang))
            out.append(f"  epochs within the phase: max {within[most]['in_phase']:.3g} ({most})")
            over = sum(r["epochs"] > warn_epochs for _, r in active)
            if over:
                out.append(f"  WARNING: {over} language(s) seen more than {warn_epochs:g} times by the end of "
                           "this phase; consider max_epochs_per_language or a higher temperature")
        out.append("")
    return "\n".join(out).rstrip("\n")


def write_index_plan(plan: Dict, folder: str) -> str:
    """``folder/index_plan.json``, written atomically; returns its path."""
    from megatron_mmbert.fileio import atomic_write_json

    path = os.path.join(folder, "index_plan.json")
    atomic_write_json(path, plan, indent=1)
    return path


def default_rank() -> int:
    """Global rank: torch.distributed when initialised, else ``$RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def build_data_index(
    manifest,
    phases: Sequence[PhaseConfig],
    seed: int,
    cache_dir: Optional[str],
    default_global_batch_size: Optional[int] = None,
    anneal_segments: int = 64,
    is_builder: Optional[bool] = None,
    timeout: float = 3600.0,
    poll_interval: float = 1.0,
    start_phase: int = 0,
    packing: str = "concat",
    bin_rows: Optional[Sequence[int]] = None,
    threads: int = 0,
) -> DataIndex:
    """The schedule's index, from the cache when present; built (by ``is_builder``, default global
    rank 0) otherwise, while the other ranks wait up to ``timeout`` seconds.

    ``manifest`` is a ``megatron_mmbert.data.shards.Manifest``. ``cache_dir=None`` builds in memory
    on every caller (tests, tiny runs). ``start_phase``: the first phase the run reads (see the
    module docstring, "Branches"). Phases naming their own manifest read it as separate streams
    (``data.shards.phase_sources``). ``packing``: ``concat`` or ``best_fit`` (module docstring).
    ``bin_rows``: best_fit's ``seq_len`` rows per packed row, one per phase (None: 1, rows of
    ``seq_len``; a run passes its micro-batch sizes under ``data.packed_row: micro_batch``).
    ``threads``: languages packed at once by the builder (0: :func:`default_threads`); the arrays do
    not depend on it.
    """
    from megatron_mmbert.data.shards import phase_sources

    _check_packing(packing)
    threads = int(threads) if threads else default_threads()
    manifest, phases = phase_sources(manifest, phases)
    tokens = {lang: e.tokens for lang, e in manifest.languages.items()}
    plans = plan_schedule(list(phases), tokens, default_global_batch_size, anneal_segments)
    if not 0 <= start_phase < len(plans):
        raise ValueError(f"start_phase {start_phase} outside the schedule's {len(plans)} phases")
    groups = check_bin_rows(plans, bin_rows if packing == "best_fit" else None)
    key = cache_key(manifest, phases, seed, default_global_batch_size, anneal_segments, start_phase, packing,
                    groups)

    def describe(arrays):
        counts = np.stack([np.asarray(arrays[f"phase{k}_counts"]) for k in range(len(plans))])
        stats = [np.asarray(arrays[f"phase{k}_packing_stats"]) for k in range(len(plans))]
        return index_plan(manifest, plans, counts, seed, start_phase, key, np.asarray(arrays["stream_positions"]),
                          packing, stats, groups)

    names = ["stream_positions"] + [f"phase{k}_{a}" for k in range(len(plans)) for a in ARRAY_NAMES]
    if cache_dir is None:  # built through a temporary folder (the one build path), then read whole
        with tempfile.TemporaryDirectory(prefix="mmbert-index-") as tmp:
            small = build_arrays(manifest, plans, seed, tmp, start_phase, packing, groups, threads)
            arrays = {name: np.load(os.path.join(tmp, name + ".npy")) for name in names}
        return _assemble(plans, arrays, "", describe(small), start_phase, packing, groups)
    final = os.path.join(os.path.abspath(cache_dir), f"mmbert-index-{key[:20]}")
    if is_builder is None:
        is_builder = default_rank() == 0
    if not os.path.isdir(final):
        if is_builder:
            os.makedirs(cache_dir, exist_ok=True)
            _progress(f"cache miss: building {final}")
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=cache_dir)
            try:
                small = build_arrays(manifest, plans, seed, tmp, start_phase, packing, groups, threads)
                with open(os.path.join(tmp, "description.json"), "w") as f:
                    json.dump({"key": key, "languages": plans[0].languages, "start_phase": start_phase,
                               "packing": packing, "bin_rows": groups, "phases": [to_dict(p) for p in phases], "seed": seed}, f, indent=1)
                write_index_plan(describe(small), tmp)
                try:
                    os.rename(tmp, final)  # atomic: the folder appears complete or not at all
                except OSError:
                    if not os.path.isdir(final):
                        raise
                    shutil.rmtree(tmp)  # another builder won the race with identical content
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:
            deadline = time.time() + timeout
            while not os.path.isdir(final):
                if time.time() > deadline:
                    raise TimeoutError(
                        f"waited {timeout:.0f}s for the data index {final} that rank 0 builds; it did not "
                        "appear. Check rank 0's log, or prebuild it before launch with "
                        "`python tools/build_data_index.py --manifest MANIFEST --config RUN.yaml "
                        f"--cache-dir {cache_dir} --seed {seed} --packing {packing}` (same phases, seed and packing)"
                    )
                time.sleep(poll_interval)
    arrays = {name: np.load(os.path.join(final, name + ".npy"), mmap_mode="r") for name in names}
    with open(os.path.join(final, "index_plan.json")) as f:
        plan_json = json.load(f)
    return _assemble(plans, arrays, final, plan_json, start_phase, packing, groups)


__all__ = [
    "INDEX_VERSION",
    "build_blending_indices",
    "pack_rows",
    "pack_best_fit",
    "PACKING_MODES",
    "PACKED_ROWS",
    "check_bin_rows",
    "framing_flags",
    "document_first_tokens",
    "packing_summary",
    "language_stream",
    "document_lengths",
    "PhaseIndex",
    "DataIndex",
    "cache_key",
    "manifest_digest",
    "stream_positions",
    "index_plan",
    "phase_end_positions",
    "format_index_plan",
    "write_index_plan",
    "build_data_index",
]
