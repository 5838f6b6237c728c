"""Raw text -> per-language Megatron shards + manifest, in parallel, resumable and deterministic.

Flow (``run_preprocess``):
1. Load the tokenizer; refuse an output folder that already holds shards of another tokenizer or
   framing (``OUT/.preprocess/state.json`` and ``OUT/manifest.json`` record them).
2. Discover the inputs and plan *work units*: segments of about ``chunk_bytes`` (byte ranges of JSONL,
   row-group runs of Parquet); consecutive small segments of one language are packed into one unit.
   A unit's id hashes its segments (path, range, size, mtime) and every option that changes its
   tokens, so the plan and the shard names depend on the inputs only, never on the worker count or
   scheduling order.
3. Each pending unit is run by a worker process: it reads its documents in file order, encodes them
   in batches, frames them and writes one shard per language it meets, ``OUT/{lang}/{prefix}-{id}``
   (``.bin``/``.idx`` via ``ShardWriter``: ``.partial`` files renamed when complete). Only then is the
   unit's marker ``OUT/.preprocess/units/{id}.json`` (counts, bad-input report) written atomically.
4. The manifest is rebuilt from all unit markers (this run's and earlier runs') and written
   atomically; the bad-input report is printed.

Resume: a unit is done iff its marker exists. A killed run leaves ``.partial`` files (removed on the
next run) and possibly renamed shards of an unmarked unit (rewritten, byte-identically, on the next
run); the manifest never names a shard of an unfinished unit. Because units and their contents are
deterministic, a killed-and-rerun preprocess produces the same bytes as an uninterrupted one.

Shards are never merged: a language's shard set is the list of its units' prefixes (see
``shards.py``), so the data is written exactly once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_mmbert.fileio import atomic_write_json
from megatron_mmbert.data.shards import (
    MANIFEST_NAME,
    LanguageEntry,
    Manifest,
    ShardWriter,
    shard_finished,
    TokenizerIdentity,
    load_manifest,
    token_dtype,
    write_manifest,
)
from megatron_mmbert.data.sources import (
    VALID_LANG,
    BadInputLog,
    ReadOptions,
    Segment,
    discover,
    plan_segments,
    read_segment,
)
from megatron_mmbert.data.tokenizer import (
    Framing, SentenceSplitter, frame_documents, load_tokenizer, resolve_tokenizer_path,
)

STATE_DIR = ".preprocess"


class PreprocessError(RuntimeError):
    """The run cannot go on (tokenizer mismatch, overlapping inputs, another run holding the lock)."""


@dataclasses.dataclass
class PreprocessConfig:
    """Everything a preprocessing run needs."""

    inputs: List[str]
    """Input files / folders (see ``sources.py`` for the formats)."""
    output: str
    """Output folder: ``{lang}/{prefix}-{unit}.bin/.idx`` and ``manifest.json``."""
    tokenizer: str
    """HF tokenizer folder or ``tokenizer.json``, or a SentencePiece ``.model``."""
    read: ReadOptions = dataclasses.field(default_factory=ReadOptions)
    """Text / language fields, fixed language, plain-text mode, split."""
    framing: Framing = dataclasses.field(default_factory=Framing)
    """Tokens around each document (mmBERT: ``<bos> ... <eos>``)."""
    workers: int = 1
    """Worker processes (each single-threaded). 1 runs in this process."""
    strict: bool = False
    """Abort on the first bad input instead of skipping and reporting it."""
    chunk_bytes: int = 128 << 20
    """Target on-disk bytes per work unit (and so per shard); fixes the output layout."""
    prefix: str = "part"
    """Shard file name prefix."""
    split_sentences: bool = False
    """Split documents into sentences with nltk punkt (one sequence per sentence)."""
    nltk_language: str = "english"
    """Punkt model used with ``split_sentences``."""
    batch_docs: int = 512
    """Documents encoded per tokenizer call."""
    log_interval_s: float = 5.0
    """Seconds between progress lines on stderr."""
    max_bad_locations: int = 5
    """Locations of bad input kept per file."""


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """Segments of input that one worker turns into one shard per language."""

    id: str
    """Hash of the segments and the options that shape the tokens; names the shards."""
    segments: Tuple[Segment, ...]
    """What to read, in order."""

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def sort_key(self) -> list:
        return [self.segments[0].path, self.segments[0].start]


@dataclasses.dataclass
class PreprocessResult:
    """What a run produced."""

    manifest: Manifest
    """The manifest as written."""
    bad_input: BadInputLog
    """Bad input over all units of the output (earlier runs included) and this run's discovery."""
    units_total: int
    """Units in this run's plan."""
    units_run: int
    """Units processed now (the rest were already done)."""


# ----------------------------------------------------------------------------------------------
# Planning


def plan_units(segments: List[Segment], chunk_bytes: int, fingerprint: str) -> List[WorkUnit]:
    """Pack consecutive segments of one fixed language into units of at most ``chunk_bytes``."""
    groups: List[List[Segment]] = []
    acc = 0
    for seg in segments:
        prev = groups[-1][-1] if groups else None
        if (
            prev is not None
            and seg.lang is not None
            and prev.lang == seg.lang
            and acc + seg.size <= chunk_bytes
        ):
            groups[-1].append(seg)
            acc += seg.size
        else:
            groups.append([seg])
            acc = seg.size
    units = []
    for group in groups:
        h = hashlib.sha256(fingerprint.encode())
        h.update(json.dumps([s.to_json() for s in group], sort_keys=True).encode())
        units.append(WorkUnit(h.hexdigest()[:16], tuple(group)))
    return units


def _fingerprint(cfg: PreprocessConfig, identity: TokenizerIdentity) -> str:
    """Options that change a unit's tokens (the worker count, chunking aside, does not)."""
    return json.dumps(
        {
            "tokenizer": identity.hash,
            "framing": cfg.framing.to_json(),
            "read": cfg.read.to_json(),
            "split_sentences": cfg.split_sentences and cfg.nltk_language,
            "prefix": cfg.prefix,
        },
        sort_keys=True,
    )


# ----------------------------------------------------------------------------------------------
# Workers

_WORKER: dict = {}  # per-process cache: tokenizer and splitter, built once by _init_worker


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a worker needs besides its unit (pickled once per worker)."""

    cfg: PreprocessConfig
    dtype: str
    prefix_ids: tuple
    suffix_ids: tuple


def _die_with_parent() -> None:
    """Linux: a worker whose parent was killed dies too, instead of finishing its unit while a rerun
    is already rewriting the same files."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(job: _Job, counters) -> None:
    if not isinstance(counters, _InlineCounters):
        _die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; parallelism is across workers
    _WORKER.clear()
    _WORKER["job"] = job
    _WORKER["tokenizer"] = load_tokenizer(job.cfg.tokenizer)
    _WORKER["splitter"] = SentenceSplitter(job.cfg.nltk_language) if job.cfg.split_sentences else None
    _WORKER["counters"] = counters


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


def _process_unit(unit: WorkUnit) -> dict:
    """Write the unit's shards, then its marker; returns the marker."""
    job: _Job = _WORKER["job"]
    cfg = job.cfg
    counters = _WORKER["counters"]
    log = BadInputLog(strict=cfg.strict, max_locations=cfg.max_bad_locations)
    writers: Dict[str, ShardWriter] = {}
    stats: Dict[str, dict] = {}
    batch: List[Tuple[str, str]] = []
    current: List[str] = [""]  # path of the segment being read (a batch never spans segments)

    def flush() -> None:
        if not batch:
            return
        encoded = _encode([t for _, t in batch])
        nbytes = [len(t.encode("utf-8")) for _, t in batch]
        by_lang: Dict[str, List[int]] = {}
        for i, (lang, _) in enumerate(batch):
            by_lang.setdefault(lang, []).append(i)
        tokens = 0
        for lang, rows in by_lang.items():
            if lang not in writers:
                prefix = os.path.join(cfg.output, lang, f"{cfg.prefix}-{unit.id}")
                writers[lang] = ShardWriter(prefix, job.dtype)
                stats[lang] = {"documents": 0, "tokens": 0, "bytes": 0, "sources": set()}
            flat, lengths, per_doc = frame_documents([encoded[i] for i in rows], job.prefix_ids, job.suffix_ids)
            writers[lang].add_documents(flat, lengths, per_doc)
            st = stats[lang]
            st["documents"] += len(rows)
            st["tokens"] += len(flat)
            st["bytes"] += sum(nbytes[i] for i in rows)
            st["sources"].add(current[0])
            tokens += len(flat)
        counters.add(docs=len(batch), text_bytes=sum(nbytes), tokens=tokens)
        batch.clear()

    try:
        for seg in unit.segments:
            current[0] = seg.path
            for lang, text in read_segment(seg, cfg.read, log, lambda n: counters.add(disk_bytes=n)):
                batch.append((lang, text))
                if len(batch) >= cfg.batch_docs:
                    flush()
            flush()
        for lang in sorted(writers):
            writers[lang].finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    marker = {
        "id": unit.id,
        "sort_key": unit.sort_key(),
        "segments": [s.to_json() for s in unit.segments],
        "shards": {
            lang: {
                "prefix": os.path.relpath(writers[lang].prefix, cfg.output),
                "documents": st["documents"],
                "tokens": st["tokens"],
                "bytes": st["bytes"],
                "sources": sorted(st["sources"]),
                "max_token_id": writers[lang].max_token_id,
            }
            for lang, st in sorted(stats.items())
        },
        "bad_input": log.files,
    }
    _write_json(os.path.join(cfg.output, STATE_DIR, "units", f"{unit.id}.json"), marker)
    return marker


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Progress


class _Counters:
    """docs / text bytes / tokens / on-disk bytes done, shared by worker processes; the main process
    prints rates and an ETA from them."""

    FIELDS = ("docs", "text_bytes", "tokens", "disk_bytes")

    def __init__(self, ctx=None) -> None:
        self._arr = (ctx or mp).Array("d", len(self.FIELDS))

    def add(self, **values) -> None:
        with self._arr.get_lock():
            for k, v in values.items():
                self._arr[self.FIELDS.index(k)] += v

    def snapshot(self) -> Dict[str, float]:
        with self._arr.get_lock():
            return dict(zip(self.FIELDS, self._arr[:]))


class _InlineCounters(_Counters):
    """Counters for a run inside this process (workers=1): prints progress as it counts."""

    def __init__(self, progress: "_Progress") -> None:
        self._values = dict.fromkeys(self.FIELDS, 0.0)
        self._progress = progress

    def add(self, **values) -> None:
        for k, v in values.items():
            self._values[k] += v
        self._progress.maybe_print(self)

    def snapshot(self) -> Dict[str, float]:
        return dict(self._values)


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


class _Progress:
    """One stderr line every ``interval`` seconds: units, docs/s, MB/s, tokens/s, ETA."""

    def __init__(self, total_disk_bytes: int, total_units: int, interval: float) -> None:
        self.start = time.monotonic()
        self.last = self.start
        self.total = max(total_disk_bytes, 1)
        self.units_total = total_units
        self.units_done = 0
        self.interval = interval

    def maybe_print(self, counters: _Counters, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        c = counters.snapshot()
        dt = max(now - self.start, 1e-9)
        frac = min(c["disk_bytes"] / self.total, 1.0)
        eta = (dt / frac - dt) if frac > 0 else float("nan")
        eta_s = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if eta == eta else "?"
        print(
            f"preprocess: {self.units_done}/{self.units_total} units, {frac:6.1%}, "
            f"{_human(c['docs'])} docs ({_human(c['docs'] / dt)}/s), "
            f"{c['text_bytes'] / dt / 1e6:.2f} MB/s, {_human(c['tokens'] / dt)} tokens/s, ETA {eta_s}",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# Output state


def _check_output(cfg: PreprocessConfig, identity: TokenizerIdentity, dtype: str) -> None:
    """Refuse to mix tokenizers / framings in one output; record ours for later runs."""
    state_path = os.path.join(cfg.output, STATE_DIR, "state.json")
    ours = {"tokenizer": identity.to_json(), "framing": cfg.framing.to_json(), "dtype": dtype}
    theirs = None
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            theirs = json.load(f)
    elif os.path.isfile(os.path.join(cfg.output, MANIFEST_NAME)):
        m = load_manifest(os.path.join(cfg.output, MANIFEST_NAME))
        theirs = {"tokenizer": m.tokenizer.to_json(), "framing": ours["framing"], "dtype": m.dtype}
    if theirs is not None:
        if theirs["tokenizer"]["hash"] != identity.hash:
            raise PreprocessError(
                f"{cfg.output} already holds shards made with tokenizer {theirs['tokenizer']['name']!r} "
                f"(sha256 {theirs['tokenizer']['hash'][:12]}...), but this run uses {identity.name!r} "
                f"(sha256 {identity.hash[:12]}...). Shards of different tokenizers cannot share a manifest: "
                "pass a new --output folder, or the tokenizer the folder was made with."
            )
        if theirs["framing"] != ours["framing"]:
            raise PreprocessError(
                f"{cfg.output} was made with framing {theirs['framing']}, this run asks for {ours['framing']}; "
                "pass a new --output folder or the same --bos/--eos settings"
            )
    _write_json(state_path, ours)


def _load_markers(output: str) -> List[dict]:
    markers = []
    for path in sorted(glob.glob(os.path.join(output, STATE_DIR, "units", "*.json"))):
        with open(path, encoding="utf-8") as f:
            markers.append(json.load(f))
    return sorted(markers, key=lambda m: (m["sort_key"], m["id"]))


def _forget_units_with_missing_shards(output: str, markers: List[dict]) -> List[dict]:
    """A finished unit whose shard was deleted since is done again (its marker is removed)."""
    kept = []
    for m in markers:
        missing = [sh["prefix"] for sh in m["shards"].values()
                   if not shard_finished(os.path.join(output, sh["prefix"]))]
        if missing:
            print(f"preprocess: unit {m['id']} lost shard(s) {missing[:3]}; processing it again", file=sys.stderr)
            os.remove(os.path.join(output, STATE_DIR, "units", f"{m['id']}.json"))
        else:
            kept.append(m)
    return kept


def _check_overlap(units: List[WorkUnit], markers: List[dict]) -> None:
    """Input already preprocessed into this output under other options (or changed since) must not
    be added a second time: a pending segment may not overlap a done one of the same file."""
    done_ids = {m["id"] for m in markers}
    done: Dict[str, List[Tuple[dict, str]]] = {}
    for m in markers:
        for s in m["segments"]:
            done.setdefault(s["path"], []).append((s, m["id"]))

    def overlaps(a: dict, b: Segment) -> bool:
        if a["stamp"] != b.stamp or a["end"] < 0 or b.end < 0:
            return True
        return a["start"] < b.end and b.start < a["end"]

    for u in units:
        if u.id in done_ids:
            continue
        for seg in u.segments:
            for s, unit_id in done.get(seg.path, []):
                if overlaps(s, seg):
                    raise PreprocessError(
                        f"{seg.path} is already in unit {unit_id} of this output, but with other options, "
                        "another --chunk-mb, or the file changed since; adding it again would duplicate its "
                        "documents. Use a new --output folder (or delete the output and start over)."
                    )


def _build_manifest(output: str, identity: TokenizerIdentity, dtype: str, markers: List[dict]) -> Manifest:
    languages: Dict[str, LanguageEntry] = {}
    for m in markers:
        for lang, sh in m["shards"].items():
            e = languages.setdefault(lang, LanguageEntry([], 0, 0, 0, []))
            e.shards.append(os.path.join(os.path.abspath(output), sh["prefix"]))
            e.documents += sh["documents"]
            e.tokens += sh["tokens"]
            e.bytes += sh["bytes"]
            e.sources.extend(p for p in sh["sources"] if p not in e.sources)
            if "max_token_id" in sh and (e.max_token_id is not None or len(e.shards) == 1):
                e.max_token_id = max(e.max_token_id or 0, sh["max_token_id"])
            else:  # a unit written before ids were recorded: the language's maximum is unknown
                e.max_token_id = None
    return Manifest(identity, dtype, languages, root=os.path.abspath(output))


def _remove_partials(output: str) -> None:
    for path in glob.glob(os.path.join(output, "**", "*.partial"), recursive=True):
        os.remove(path)
    for path in glob.glob(os.path.join(output, STATE_DIR, "**", "*.partial"), recursive=True):
        os.remove(path)


# ----------------------------------------------------------------------------------------------
# Entry point


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Preprocess ``cfg.inputs`` into ``cfg.output``; see the module docstring."""
    if not VALID_LANG.match(cfg.prefix):  # the same rule as a folder name: no "/", "..", absolute paths
        raise PreprocessError(f"--prefix {cfg.prefix!r}: give a plain file-name prefix (letters, digits, _ . -)")
    if cfg.chunk_bytes < 1 or cfg.workers < 1 or cfg.batch_docs < 1:
        raise PreprocessError("chunk_bytes, workers and batch_docs must be positive")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer_path = os.path.abspath(resolve_tokenizer_path(cfg.tokenizer))  # a Hub id: its snapshot, once
    cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output), tokenizer=tokenizer_path)
    tokenizer = load_tokenizer(cfg.tokenizer)
    identity = tokenizer.identity
    prefix_ids, suffix_ids = cfg.framing.ids(identity)
    if cfg.split_sentences:
        SentenceSplitter(cfg.nltk_language)  # fail now, not in every worker
    dtype = token_dtype(identity.vocab_size).name
    os.makedirs(os.path.join(cfg.output, STATE_DIR), exist_ok=True)

    lock = open(os.path.join(cfg.output, STATE_DIR, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PreprocessError(f"another preprocess is writing to {cfg.output}; wait for it to finish") from None
    try:
        _check_output(cfg, identity, dtype)
        plan_log = BadInputLog(strict=cfg.strict, max_locations=cfg.max_bad_locations)
        sources = discover(cfg.inputs, cfg.read, plan_log)
        segments = plan_segments(sources, cfg.chunk_bytes, cfg.read, plan_log)
        units = plan_units(segments, cfg.chunk_bytes, _fingerprint(cfg, identity))
        markers = _load_markers(cfg.output)
        _check_overlap(units, markers)
        _remove_partials(cfg.output)
        markers = _forget_units_with_missing_shards(cfg.output, markers)
        done = {m["id"] for m in markers}
        pending = [u for u in units if u.id not in done]
        # Biggest first: the tail of the run is not one large unit on one busy worker.
        pending.sort(key=lambda u: (-u.size, u.id))
        print(
            f"preprocess: {len(units)} units planned, {len(units) - len(pending)} already done, "
            f"{len(pending)} to run on {cfg.workers} worker(s); tokenizer {identity.name} "
            f"(vocab {identity.vocab_size}, {dtype})",
            file=sys.stderr,
            flush=True,
        )
        job = _Job(cfg, dtype, tuple(prefix_ids), tuple(suffix_ids))
        progress = _Progress(sum(u.size for u in pending), len(pending), cfg.log_interval_s)
        if pending:
            _run_units(pending, job, cfg.workers, progress)
        markers = _load_markers(cfg.output)
        manifest = _build_manifest(cfg.output, identity, dtype, markers)
        write_manifest(manifest, os.path.join(cfg.output, MANIFEST_NAME))
    finally:
        lock.close()

    report = BadInputLog(max_locations=cfg.max_bad_locations)
    report.merge(plan_log.files)
    for m in markers:
        report.merge(m["bad_input"])
    print(report.report(), file=sys.stderr, flush=True)
    return PreprocessResult(manifest, report, len(units), len(pending))


def _run_units(pending: List[WorkUnit], job: _Job, workers: int, progress: _Progress) -> None:
    if workers <= 1:
        counters = _InlineCounters(progress)
        _init_worker(job, counters)
        try:
            for unit in pending:
                _process_unit(unit)
                progress.units_done += 1
        finally:
            _WORKER.clear()
        progress.maybe_print(counters, force=True)
        return
    # spawn: workers never inherit a tokenizer whose thread pool was already used (fork-unsafe).
    ctx = mp.get_context("spawn")
    counters = _Counters(ctx)
    with ctx.Pool(min(workers, len(pending)), initializer=_init_worker, initargs=(job, counters)) as pool:
        results = pool.imap_unordered(_process_unit, pending, chunksize=1)
        remaining = len(pending)
        while remaining:
            try:
                results.next(timeout=min(progress.interval, 1.0))
            except mp.TimeoutError:
                progress.maybe_print(counters)
                continue
            remaining -= 1
            progress.units_done += 1
            progress.maybe_print(counters)
        pool.close()
        pool.join()
    progress.maybe_print(counters, force=True)
