"""The index build: every array of a schedule into a folder (:func:`build_arrays`), blending phase by
phase (:mod:`~megatron_mmbert.data.index.blend`) then packing language by language
(:mod:`~megatron_mmbert.data.index.pack`), languages on ``threads`` worker threads
(:func:`_pack_languages`: which language runs when, within a document budget, and the copy of their
spilled blocks into the phase files in language order), with progress (rate, ETA) on stderr.

Memory flat in the run's length: see :func:`build_arrays` and docs/data.md "Cache"."""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_mmbert.data.index.blend import blend_phase
from megatron_mmbert.data.index.extension import load_extension
from megatron_mmbert.data.index.pack import EMPTY, PhaseFiles, SpillFiles, SpillMemory, pack_language
from megatron_mmbert.data.index.packing import PACKING_STATS, check_best_fit_tokenizer, check_bin_rows, check_packing
from megatron_mmbert.data.index.plan import stream_positions
from megatron_mmbert.data.schedule import PhasePlan
from megatron_mmbert.progress import Progress

THREAD_DOCUMENT_BUDGET = 1 << 30
"""Documents of the languages packed (or waiting) on threads at once: each holds 6 bytes a document
with best_fit (its compact length / framing table, an epoch's permutation; concat: 9), so at most
~6 GiB (9) whatever the thread count; a language larger than this runs alone."""


def default_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def build_arrays(manifest, plans: List[PhasePlan], seed: int, out_dir: str, start_phase: int = 0,
                 packing: str = "concat", bin_rows: Optional[Sequence[int]] = None,
                 threads: int = 1) -> Dict[str, np.ndarray]:
    """Build every array of the schedule into ``out_dir/{name}.npy`` (names as in the cache) and
    return the small ones (``phase{k}_counts``, ``phase{k}_packing_stats``, ``stream_positions``).
    Phases before ``start_phase`` only contribute their sample counts (and so the stream positions;
    best_fit packs them to know where their streams end, without storing the rows).

    Memory flat in the run's length: the blending runs phase by phase in blocks of
    :data:`~megatron_mmbert.data.index.blend.BLEND_CHUNK` samples (``_index_builder.PhaseBlender``), the
    packing language by language in blocks of :data:`~megatron_mmbert.data.index.pack.PACK_BLOCK_TOKENS`
    row tokens (``RowPacker`` / ``BestFitPacker``: resumable, the same rows as one call), each block
    appended to its file (:class:`~megatron_mmbert.data.index.npy.NpyAppender`) and dropped. What
    remains is per language and independent of the schedule: one epoch's permutation (4 bytes a
    document) and its document lengths and framing flags (best_fit: one uint16 a document, the flags
    folded in, long documents apart, :func:`~megatron_mmbert.data.index.documents.document_table`;
    concat: 5 bytes a document). Arrays that can outgrow
    int32 (``dataset_sample_index``, ``sample_idx``, ``row_ptr``) are int32 when their values fit
    (checked) and int64 otherwise; readers take either.

    ``threads``: languages packed at once (the C++ packers release the GIL); the output does not
    depend on it. With more than one, languages start longest first (:func:`language_schedule`), at
    most ``2 x threads`` and :data:`THREAD_DOCUMENT_BUDGET` documents submitted at once, and each
    language's blocks wait until the languages before it are written: in memory while they fit
    (:data:`~megatron_mmbert.data.index.pack.SPILL_MEMORY_BYTES` for all), else in a spill folder of
    ``out_dir`` (on disk: at worst the rest of the index once more, while the longest language packs); the
    framing scans' chunks run on a pool of ``threads`` threads of their own.

    ``bin_rows`` (best_fit): ``seq_len`` rows per packed row, one per phase (default 1); the phase's
    samples are blended in groups of that many rows (:func:`~megatron_mmbert.data.index.packing.check_bin_rows`).
    Progress (samples blended, then languages packed: rate, ETA) goes to stderr."""
    check_packing(packing)
    if packing == "best_fit":
        check_best_fit_tokenizer(manifest)
    ext = load_extension()
    languages = plans[0].languages
    K = len(plans)
    groups = check_bin_rows(plans, bin_rows if packing == "best_fit" else None)
    path = lambda name: os.path.join(out_dir, name + ".npy")  # noqa: E731
    counts = np.zeros((K, len(languages)), dtype=np.int64)
    progress = Progress("build_data_index", sum(p.num_samples for p in plans), "samples", sys.stderr)
    # Blending, phase by phase (deficits restart at each phase, and a phase's sample numbers count
    # from its own first row of each language: the same arrays as one schedule-wide call).
    for k, plan in enumerate(plans):
        counts[k] = blend_phase(ext, plan, k, groups[k], k >= start_phase, path, progress)
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


class _LanguagesOnThreads:
    """Languages packed on a pool's threads: started in ``order`` (:func:`language_schedule`) while
    fewer than ``2 x threads`` run and their documents stay within :data:`THREAD_DOCUMENT_BUDGET` (a
    larger language runs alone), taken back in language order (:meth:`result`)."""

    def __init__(self, pool, spilled, order: List[int], docs: Sequence[int], threads: int):
        self.pool, self.spilled, self.order, self.docs, self.threads = pool, spilled, order, docs, threads
        self.at = 0
        self.futures, self.running = {}, {}  # language -> future; submitted and not finished -> its documents

    def _start(self) -> None:
        while self.at < len(self.order) and len(self.running) < 2 * self.threads:
            j = self.order[self.at]
            if self.running and sum(self.running.values()) + self.docs[j] > THREAD_DOCUMENT_BUDGET:
                return
            self.futures[j] = self.pool.submit(self.spilled, j)
            self.running[j] = self.docs[j]
            self.at += 1

    def result(self, i: int):
        """Language ``i``'s (result, spill files), once it is done; another language's failure is
        raised as soon as it happens, not when its turn comes."""
        from concurrent.futures import FIRST_COMPLETED, wait

        while not (i in self.futures and self.futures[i].done()):
            self._start()
            wait([self.futures[j] for j in self.running], return_when=FIRST_COMPLETED)
            for j in [j for j in self.running if self.futures[j].done()]:
                del self.running[j]
                if self.futures[j].exception() is not None:
                    self.futures[j].result()
        self.running.pop(i, None)
        return self.futures.pop(i).result()


def _pack_languages(ext, manifest, plans, counts, positions, seed, start_phase, packing, groups, path,
                    threads: int, out_dir: str) -> np.ndarray:
    """Pack every language in order into the phase files (``threads`` at once), fill best_fit's
    ``positions`` and write the offset arrays; returns the packing stats [K, L, 8]."""
    from concurrent.futures import ThreadPoolExecutor

    languages = plans[0].languages
    K, L = len(plans), len(languages)
    active = counts.sum(axis=0) > 0 if packing == "best_fit" else counts[start_phase:].sum(axis=0) > 0
    need = [i for i in range(L) if active[i]]
    files = PhaseFiles(path, K)
    offsets = {name: np.zeros((K, L + 1), np.int64) for name in ("docs", "rows", "pieces")}
    stats = np.zeros((K, L, len(PACKING_STATS)), np.int64)
    docs = [int(manifest.languages[lang].documents) for lang in languages]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    # The framing scans' chunks, of every language, on threads of their own: the largest language's
    # scan (the critical path's longest part) is spread over them; its packer thread waits meanwhile.
    framing_pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def task(i, sink):
        return pack_language(ext, manifest, languages[i], plans, counts[:, i], positions[:, i], seed, start_phase,
                             packing, groups, sink, framing_pool, threads)

    memory = SpillMemory()  # SPILL_MEMORY_BYTES

    def spilled(i):
        sink = SpillFiles(os.path.join(out_dir, f".spill-{i}"), memory)
        try:
            return task(i, sink), sink
        finally:
            sink.close()

    progress = Progress("build_data_index", len(need), "languages", sys.stderr)
    try:
        ahead = None if pool is None else _LanguagesOnThreads(
            pool, spilled, language_schedule(plans, counts, docs, active), docs, threads)
        for i in range(L):
            if not active[i]:  # no rows anywhere: the empty entries, lengths not even read
                for k in range(K):
                    files.append(k, "rows", EMPTY["rows"])
                    files.append(k, "ptr", EMPTY["ptr"])
                offsets["rows"][:, i + 1] = 1
                continue
            if ahead is not None:  # started longest first, written in language order
                res, sink = ahead.result(i)
                sink.copy_into(files)
            else:
                res = task(i, files)
            _record_language(i, res, positions, stats, offsets, packing)
            progress.advance(1, f"packed {languages[i]}")
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
    """Language ``i``'s results (:func:`~megatron_mmbert.data.index.pack.pack_language`) into the
    schedule's tables."""
    stats[:, i] = res["stats"]
    if packing == "best_fit":
        positions[:, i] = res["positions"]
    for key in ("docs", "rows", "pieces"):
        offsets[key][:, i + 1] = res[key]


__all__ = ["THREAD_DOCUMENT_BUDGET", "LANGUAGE_DOCUMENT_COST", "default_threads", "build_arrays", "language_schedule"]
