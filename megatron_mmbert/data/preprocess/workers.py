"""The workers: one unit's documents read, encoded in batches, framed and written, one shard per language.

A worker reads its unit's documents in file order, sends each held-out document (``holdout.HoldoutRule``)
to ``heldout/{lang}``, encodes them in batches of ``batch_docs``, frames them and writes one shard per
language it meets, ``OUT/{lang}/{prefix}-{id}`` (``.bin``/``.idx`` via ``ShardWriter``: ``.partial``
files renamed when complete). Only then is the unit's marker written (``markers.write_marker``).
:func:`run_units` runs the pending units in this process or in spawned workers (``pool.py``), counting
their progress (``counters.py``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
from typing import Dict, List, Optional, Tuple

from megatron_mmbert.data.preprocess.config import PreprocessConfig
from megatron_mmbert.data.preprocess.counters import Counters, InlineCounters, RunProgress
from megatron_mmbert.data.preprocess.holdout import HoldoutRule, doc_hash
from megatron_mmbert.data.preprocess.markers import write_marker
from megatron_mmbert.data.preprocess.pool import map_unordered
from megatron_mmbert.data.preprocess.units import WorkUnit
from megatron_mmbert.data.shards import HELDOUT_DIR, ShardWriter
from megatron_mmbert.data.sources import BadInputLog, read_segment
from megatron_mmbert.data.tokenizer import SentenceSplitter, frame_documents, load_tokenizer

_WORKER: dict = {}  # per-process cache: the job, tokenizer, splitter and counters, set by _init_worker


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs besides its unit (pickled once per worker)."""

    cfg: PreprocessConfig
    dtype: str
    prefix_ids: tuple
    suffix_ids: tuple
    holdout: HoldoutRule = HoldoutRule()
    framing_ids: Optional[tuple] = None
    """The tokenizer's ``(bos, eos)`` ids (either None), whose documents each shard counts for the
    manifest's ``framing`` record (``ShardWriter.framing``)."""


def _init_worker(job: Job, counters: Counters) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; parallelism is across workers
    _WORKER.clear()
    _WORKER["job"] = job
    _WORKER["tokenizer"] = load_tokenizer(job.cfg.tokenizer)
    _WORKER["splitter"] = SentenceSplitter(job.cfg.nltk_language) if job.cfg.split_sentences else None
    _WORKER["counters"] = counters


def run_units(pending: List[WorkUnit], job: Job, progress: RunProgress) -> None:
    """Run every pending unit (biggest first is the caller's order): in this process with ``workers`` 1,
    else in a spawned pool; print progress as they go and once at the end."""
    workers = job.cfg.workers
    counters = InlineCounters(progress) if workers <= 1 else Counters(mp.get_context("spawn"))
    try:
        for _ in map_unordered(_process_unit, pending, workers, _init_worker, (job, counters),
                               on_wait=lambda: progress.maybe_print(counters), wait_s=min(progress.interval, 1.0)):
            progress.units_done += 1
            progress.maybe_print(counters)
    finally:
        _WORKER.clear()  # a run in this process: its tokenizer goes with it
    progress.maybe_print(counters, force=True)


class UnitShards:
    """The shards one unit writes, keyed by their folder under the output: ``{lang}``, or
    ``heldout/{lang}`` for held-out documents; each with its counts for the marker."""

    def __init__(self, job: Job, unit: WorkUnit) -> None:
        self.job, self.unit = job, unit
        self.writers: Dict[str, ShardWriter] = {}
        self.stats: Dict[str, dict] = {}

    def add(self, keys: List[str], encoded: List[List[List[int]]], nbytes: List[int], source: str) -> int:
        """Frame and write a batch's documents (``keys[i]``: the folder of document i); returns its tokens."""
        by_key: Dict[str, List[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        tokens = 0
        for key, rows in by_key.items():
            if key not in self.writers:
                cfg = self.job.cfg
                self.writers[key] = ShardWriter(os.path.join(cfg.output, key, f"{cfg.prefix}-{self.unit.id}"),
                                                self.job.dtype, framing_ids=self.job.framing_ids)
                self.stats[key] = {"documents": 0, "tokens": 0, "bytes": 0, "sources": set()}
            flat, lengths, per_doc = frame_documents([encoded[i] for i in rows], self.job.prefix_ids,
                                                     self.job.suffix_ids)
            self.writers[key].add_documents(flat, lengths, per_doc)
            st = self.stats[key]
            st["documents"] += len(rows)
            st["tokens"] += len(flat)
            st["bytes"] += sum(nbytes[i] for i in rows)
            st["sources"].add(source)
            tokens += len(flat)
        return tokens

    def finalize(self) -> None:
        for key in sorted(self.writers):
            self.writers[key].finalize()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    def entries(self, held: bool) -> dict:
        """The marker's entries of the training (or held-out) shards: prefixes relative to the output (or
        to ``OUT/heldout``, the held-out manifest's folder)."""
        root = os.path.join(self.job.cfg.output, HELDOUT_DIR) if held else self.job.cfg.output
        return {
            key.split("/", 1)[-1]: {
                "prefix": os.path.relpath(self.writers[key].prefix, root),
                "documents": st["documents"],
                "tokens": st["tokens"],
                "bytes": st["bytes"],
                "sources": sorted(st["sources"]),
                "max_token_id": self.writers[key].max_token_id,
                **({"framing": self.writers[key].framing.to_json()} if self.writers[key].framing else {}),
            }
            for key, st in sorted(self.stats.items())
            if key.startswith(HELDOUT_DIR + "/") == held
        }


def _encode(texts: List[str]) -> List[List[List[int]]]:
    """Each document as a list of sentences' ids (one 'sentence' when not splitting)."""
    tok, splitter = _WORKER["tokenizer"], _WORKER["splitter"]
    if splitter is None:
        return [[ids] for ids in tok.encode_batch(texts)]
    sentences = [splitter.split(t) for t in texts]
    flat = tok.encode_batch([s for doc in sentences for s in doc])
    out, i = [], 0
    for doc in sentences:
        out.append(flat[i : i + len(doc)])
        i += len(doc)
    return out


def _write_batch(shards: UnitShards, batch: List[Tuple[str, str]], source: str) -> None:
    """Encode and write a batch of (folder key, text) read from ``source``; count it; empty the batch."""
    if not batch:
        return
    encoded = _encode([t for _, t in batch])
    nbytes = [len(t.encode("utf-8")) for _, t in batch]
    tokens = shards.add([key for key, _ in batch], encoded, nbytes, source)
    _WORKER["counters"].add(docs=len(batch), text_bytes=sum(nbytes), tokens=tokens)
    batch.clear()


def _process_unit(unit: WorkUnit) -> dict:
    """Write the unit's shards, then its marker; returns the marker."""
    job: Job = _WORKER["job"]
    cfg = job.cfg
    counters = _WORKER["counters"]
    log = BadInputLog(strict=cfg.strict, max_locations=cfg.max_bad_locations)
    shards = UnitShards(job, unit)
    batch: List[Tuple[str, str]] = []  # never spans segments: each document's source is its segment's file
    try:
        for seg in unit.segments:
            for lang, text in read_segment(seg, cfg.read, log, lambda n: counters.add(disk_bytes=n)):
                if job.holdout.held_out(lang, doc_hash(text)):
                    lang = f"{HELDOUT_DIR}/{lang}"  # no language has a "/": never a training folder
                batch.append((lang, text))
                if len(batch) >= cfg.batch_docs:
                    _write_batch(shards, batch, seg.path)
            _write_batch(shards, batch, seg.path)
        shards.finalize()
    except BaseException:
        shards.abort()
        raise
    return write_marker(cfg.output, unit, shards.entries(held=False), log.files,
                        shards.entries(held=True) if cfg.holdout else None)
