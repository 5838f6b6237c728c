"""Raw text -> per-language Megatron shards + manifest, in parallel, resumable and deterministic.

One subject, one file (it is long on purpose): the plan, the workers, resume, shard tasks and the
held-out split all rest on one invariant -- a unit's id and bytes depend on the inputs and options
only -- and each step below checks or relies on it; split apart, that invariant would have no home.
Readers, tokenizers and the shard format live in ``sources.py``, ``tokenizer.py`` and ``shards.py``.

Flow (``run_preprocess``):
1. Load the tokenizer; refuse an output folder that already holds shards of another tokenizer or
   framing (``OUT/.preprocess/state.json`` and ``OUT/manifest.json`` record them). Its files are
   copied into the output (:func:`megatron_mmbert.checkpoints.layout.store_tokenizer`).
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

Many nodes (a Slurm array): the plan is the same in every process, so ``num_shards``/``shard_index``
(read from ``SLURM_ARRAY_TASK_*`` when set) deal its units out to N tasks (``assign_shards``: biggest
first, each to the least-loaded shard). A shard task runs only its units and writes no manifest;
tasks hold the output lock shared plus their own shard lock, and touch only their own units' files,
so they run side by side. ``finalize`` then runs no unit: it checks that every unit of the plan has
its marker (naming the missing ones and the shard task that owns them) and writes the manifest, the
same bytes a one-process run writes.

Held-out data (``holdout_docs`` / ``holdout_fraction``): documents chosen by the sha256 of their normalised
text (``normalize_text``: NFC, whitespace runs as one space, stripped) go
to ``OUT/heldout/{lang}/`` with their own ``OUT/heldout/manifest.json`` (same format) and never into the
training shards. ``holdout_fraction`` f holds out a document iff its hash, read as a number in [0, 1), is
below f: a property of the text alone. ``holdout_docs`` N holds out, per language, the texts of the N smallest
hashes whose documents (every copy counted) fit in min(N, half of the language's documents); a first pass
(``_scan_unit``, parallel over the units, cached per unit in ``OUT/.preprocess/holdout/``) reads the
documents without tokenizing and keeps each unit's N smallest per language with their counts, and the
selection is taken from their union (``select_heldout``). Both depend on the inputs only, never on workers,
units or shard tasks; every copy of a held-out text is held out, in every language it appears in, so a
duplicate never leaks it into training; a language that would lose more than half of its documents so is
an error naming it. The selection is recorded in
``OUT/.preprocess/holdout.json``; a rerun that would select differently (inputs added) while units are done
is refused.

Bad input is loud when it is most of the input: a source that yields no document is an error naming it,
the keys looked for and the keys it has; more than ``max_bad_fraction`` of bad records is an error.
Both are raised (``BadInputFractionError``) after the manifest and the report are written, so nothing
done is lost and a rerun with fixed options resumes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
import unicodedata
from typing import Dict, List, Optional, Tuple


from megatron_mmbert.checkpoints.layout import store_tokenizer
from megatron_mmbert.fileio import LockFileRefused, atomic_write_json, open_lock_file
from megatron_mmbert.progress import format_eta
from megatron_mmbert.data.shards import (
    HELDOUT_DIR,
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
    BAD_KINDS,
    BadInputLog,
    ReadOptions,
    Segment,
    discover,
    plan_segments,
    read_segment,
    source_keys,
)
from megatron_mmbert.config_base import SAFE_NAME
from megatron_mmbert.data.tokenizer import (
    Framing, SentenceSplitter, frame_documents, load_tokenizer, resolve_tokenizer_path,
)

STATE_DIR = ".preprocess"


class PreprocessError(RuntimeError):
    """The run cannot go on (tokenizer mismatch, overlapping inputs, another run holding the lock).

    ``field`` is the :class:`PreprocessConfig` field to blame (dotted, ``framing.bos``) when one is,
    so a command line can name the option that sets it; the message names the field, never a flag."""

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


class BadInputFractionError(PreprocessError):
    """Too much of the input was bad, or a source yielded nothing; raised after the manifest and the
    report were written. ``result`` is what the run produced."""

    def __init__(self, message: str, result: "PreprocessResult") -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class PreprocessConfig:
    """Everything a preprocessing run needs."""

    inputs: List[str]
    """Input files (.jsonl/.json/.ndjson[.gz|.zst], .parquet, .arrow, .txt[.gz|.zst]), a FineWeb2
    folder (data/{lang}_{Script}/train/*.parquet), a datasets save_to_disk folder, or any folder
    of such files."""
    output: str
    """Output folder: ``{lang}/{prefix}-{unit}.bin/.idx`` and ``manifest.json`` (a rerun resumes it)."""
    tokenizer: str
    """HF tokenizer folder or ``tokenizer.json``, a SentencePiece ``.model``, or a Hub id ``org/name[@revision]``."""
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
    max_bad_fraction: float = 0.01
    """Fail (non-zero exit) when more than this fraction of the records read was bad (skipped), or when an
    input yields no documents at all; checked after the manifest and the bad-input report are written.
    1.0 accepts anything (sources without documents are then only reported)."""
    num_shards: int = 1
    """Split the unit plan over this many separate tasks (a Slurm array, one node each); each does only
    its units and writes no manifest; ``finalize`` writes it once all are done."""
    shard_index: Optional[int] = None
    """This task's shard, 0-based, below ``num_shards`` (required when ``num_shards > 1``)."""
    finalize: bool = False
    """Run no unit: check that every unit of the plan is done (by the shard tasks) and write the manifest.
    Give the same inputs and options as the shard tasks, without the shard fields."""
    holdout_docs: int = 0
    """Hold out this many documents per language (the N smallest sha256 of their text; at most half of a
    language's documents) into ``OUT/heldout/`` with its own manifest, never into the training shards.
    Deterministic: the same documents whatever the workers, units or shard tasks. 0: none."""
    holdout_fraction: float = 0.0
    """Instead of ``holdout_docs``: hold out each document whose text's sha256, as a number in [0, 1), is below
    this fraction (no extra pass over the input; about this fraction of every language). 0: none."""
    language_list: str = "mmbert-1833"
    """Report which languages of this list the finished manifest lacks and which keys it has beyond it
    (``data/languages.py``): ``mmbert-1833`` (mmBERT's released 1,833), a file of codes, or ``none``."""

    @property
    def holdout(self) -> bool:
        return self.holdout_docs > 0 or self.holdout_fraction > 0


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

    manifest: Optional[Manifest]
    """The manifest as written; None for a shard task (``finalize`` writes it)."""
    bad_input: BadInputLog
    """Bad input over all units of the output (earlier runs included) and this run's discovery."""
    units_total: int
    """Units in this run's plan."""
    units_run: int
    """Units processed now (the rest were already done)."""
    units_in_shard: Optional[int] = None
    """Units of the plan this shard task owns (None when not sharded)."""


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
    fields = {
        "tokenizer": identity.hash,
        "framing": cfg.framing.to_json(),
        "read": cfg.read.to_json(),
        "split_sentences": cfg.split_sentences and cfg.nltk_language,
        "prefix": cfg.prefix,
    }
    if cfg.holdout:  # absent otherwise: outputs made before held-out data existed keep their unit ids
        fields["holdout"] = {"docs": cfg.holdout_docs, "fraction": cfg.holdout_fraction, "hash": HASH_RULE}
    return json.dumps(fields, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Held-out documents


HASH_RULE = "sha256(NFC, whitespace runs as one space, stripped)"
"""How a document's text is normalised before hashing (recorded in the unit fingerprint): near-duplicates
that differ only in Unicode composition or whitespace (a trailing newline, CRLF, doubled spaces) hash alike,
so no copy of a held-out text trains."""


def normalize_text(text: str) -> str:
    """The text the held-out hash is taken of: Unicode NFC, every run of whitespace (``str.split``'s
    definition) replaced by one space, none at either end. Case and punctuation are kept."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def doc_hash(text: str) -> str:
    """What selects held-out documents: the sha256 (hex) of the document's normalised UTF-8 text."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class HoldoutRule:
    """Which documents are held out: a hash below ``fraction`` (as a number in [0, 1)), or one of ``hashes``
    (whatever the document's language: a text held out in one language is held out in every language)."""

    fraction: float = 0.0
    hashes: Optional[frozenset] = None
    """The selected hashes (``holdout_docs``), the union over languages."""

    def held_out(self, lang: str, digest: str) -> bool:
        if self.hashes is not None:
            return digest in self.hashes
        return self.fraction > 0 and int(digest[:16], 16) < self.fraction * (1 << 64)


def _scan_unit(unit: WorkUnit) -> dict:
    """A unit's ``holdout_docs`` candidates: per language its N smallest distinct hashes with the number of
    documents of each, and its document count (bad records are skipped here and reported by the unit's
    real run). A hash among a language's N smallest overall is among every unit's N smallest, so summing
    the units' counts gives its exact count."""
    cfg: PreprocessConfig = _WORKER["scan_cfg"]
    log = BadInputLog(strict=False, max_locations=0)
    seen: Dict[str, Dict[str, int]] = {}
    docs: Dict[str, int] = {}
    for seg in unit.segments:
        for lang, text in read_segment(seg, cfg.read, log, lambda n: None):
            counts = seen.setdefault(lang, {})
            digest = doc_hash(text)
            counts[digest] = counts.get(digest, 0) + 1
            docs[lang] = docs.get(lang, 0) + 1
    return {"id": unit.id, "holdout_docs": cfg.holdout_docs,
            "languages": {lang: {"documents": docs[lang],
                                 "smallest": [[h, c[h]] for h in sorted(c)[: cfg.holdout_docs]]}
                          for lang, c in sorted(seen.items())}}


def select_heldout(candidates: Dict[str, Dict[str, int]], documents: Dict[str, int], holdout_docs: int
                   ) -> Dict[str, List[str]]:
    """language -> its held-out hashes: the smallest of its candidate texts (hash -> documents) whose
    documents fit in ``min(holdout_docs, documents // 2)``. The cap counts documents, every copy of a
    text included, so training keeps at least half of every language. Then every selected text is held
    out in every language it appears in; a language that would so lose more than half of its documents
    is an error naming it."""
    selection: Dict[str, List[str]] = {}
    for lang, counts in sorted(candidates.items()):
        cap, taken, chosen = min(holdout_docs, documents[lang] // 2), 0, []
        for h in sorted(counts):
            if taken + counts[h] <= cap:
                chosen.append(h)
                taken += counts[h]
        selection[lang] = chosen
    union = {h for hs in selection.values() for h in hs}
    over = []
    for lang, counts in sorted(candidates.items()):
        held = sum(c for h, c in counts.items() if h in union)
        if held * 2 > documents[lang]:
            over.append(f"{lang} ({held} of {documents[lang]})")
    if over:
        raise_over_half(over)
    return selection


def raise_over_half(over: List[str]) -> None:
    raise PreprocessError(
        f"held-out data would take more than half of the documents of {', '.join(over[:10])}"
        f"{' ...' if len(over) > 10 else ''}: a held-out text is held out in every language it appears in, and "
        "these languages share texts with others' held-out selections. Lower holdout_docs / holdout_fraction, "
        "or remove the duplicated texts from the inputs", field="holdout_docs")


def check_heldout_share(markers: List[dict]) -> None:
    """After all units: no language lost more than half of its documents to the held-out split (a text
    held out for another language also counts; with ``holdout_fraction`` a small language can draw it)."""
    train: Dict[str, int] = {}
    held: Dict[str, int] = {}
    for m in markers:
        for lang, sh in m.get("shards", {}).items():
            train[lang] = train.get(lang, 0) + sh["documents"]
        for lang, sh in m.get("heldout", {}).items():
            held[lang] = held.get(lang, 0) + sh["documents"]
    over = [f"{lang} ({n} of {n + train.get(lang, 0)})" for lang, n in sorted(held.items())
            if n > train.get(lang, 0)]
    if over:
        raise_over_half(over)


def _init_scanner(cfg: PreprocessConfig) -> None:
    _die_with_parent()
    _WORKER.clear()
    _WORKER["scan_cfg"] = cfg


def _holdout_rule(cfg: PreprocessConfig, units: List[WorkUnit], markers: List[dict]) -> HoldoutRule:
    """The held-out selection of this plan (scanning the units not scanned before), checked against the one
    the output's finished units were made with."""
    if not cfg.holdout_docs:
        return HoldoutRule(fraction=cfg.holdout_fraction)
    scan_dir = os.path.join(cfg.output, STATE_DIR, "holdout")
    scans: Dict[str, dict] = {}
    for u in units:
        path = os.path.join(scan_dir, f"{u.id}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                scans[u.id] = json.load(f)
    todo = [u for u in units if u.id not in scans]
    if todo:
        print(f"preprocess: held-out selection: reading {len(todo)} of {len(units)} unit(s) for their document "
              f"hashes on {cfg.workers} worker(s)", file=sys.stderr, flush=True)
        start = last = time.monotonic()

        def keep(scan: dict) -> None:
            nonlocal last
            scans[scan["id"]] = scan
            _write_json(os.path.join(scan_dir, f"{scan['id']}.json"), scan)
            if time.monotonic() - last >= cfg.log_interval_s:
                last = time.monotonic()
                print(f"preprocess: held-out selection: {len(scans)}/{len(units)} units read "
                      f"({last - start:.0f}s)", file=sys.stderr, flush=True)

        if cfg.workers <= 1:
            _WORKER["scan_cfg"] = cfg
            try:
                for u in todo:
                    keep(_scan_unit(u))
            finally:
                _WORKER.clear()
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(cfg.workers, len(todo)), initializer=_init_scanner, initargs=(cfg,)) as pool:
                for scan in pool.imap_unordered(_scan_unit, sorted(todo, key=lambda u: (-u.size, u.id))):
                    keep(scan)
    candidates: Dict[str, Dict[str, int]] = {}
    documents: Dict[str, int] = {}
    for scan in scans.values():
        for lang, entry in scan["languages"].items():
            counts = candidates.setdefault(lang, {})
            for h, c in entry["smallest"]:
                counts[h] = counts.get(h, 0) + c
            documents[lang] = documents.get(lang, 0) + entry["documents"]
    # Only the N smallest of each language's union are exact (a larger hash may be missing in some unit).
    candidates = {lang: {h: c[h] for h in sorted(c)[: cfg.holdout_docs]} for lang, c in candidates.items()}
    selection = select_heldout(candidates, documents, cfg.holdout_docs)
    record = {"holdout_docs": cfg.holdout_docs, "hash": HASH_RULE, "units": sorted(u.id for u in units),
              "languages": selection}
    path = os.path.join(cfg.output, STATE_DIR, "holdout.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if before.get("languages") != selection and any("heldout" in m for m in markers):
            raise PreprocessError(
                f"{cfg.output}: the held-out selection of these inputs (the {cfg.holdout_docs} smallest document "
                "hashes per language) differs from the one its finished units were made with (inputs added or "
                "changed since?); their training shards would hold documents now held out. Use a new output folder.",
                field="output",
            )
    _write_json(path, record)
    return HoldoutRule(hashes=frozenset(h for hs in selection.values() for h in hs))


def assign_shards(units: List[WorkUnit], num_shards: int) -> Dict[str, int]:
    """unit id -> shard index. Biggest unit first, each to the least-loaded shard (ties: lowest index):
    a function of the plan alone, so every task of an array computes the same assignment."""
    loads = [0] * num_shards
    out: Dict[str, int] = {}
    for u in sorted(units, key=lambda u: (-u.size, u.id)):
        i = min(range(num_shards), key=lambda k: (loads[k], k))
        out[u.id] = i
        loads[i] += max(u.size, 1)
    return out


def slurm_array_shard(env=None) -> Optional[Tuple[int, int]]:
    """(num_shards, shard_index) of a Slurm array task, or None outside one.

    ``SLURM_ARRAY_TASK_ID`` runs from ``SLURM_ARRAY_TASK_MIN`` (not necessarily 0: ``--array=1-8``) in
    steps of ``SLURM_ARRAY_TASK_STEP``; the index is the task's position in that range. An array with
    gaps (``--array=0,3,7``) has no such position: set ``num_shards``/``shard_index`` then."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        low, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    except ValueError:
        raise PreprocessError("SLURM_ARRAY_TASK_* are not integers; set num_shards and shard_index",
                             field="num_shards") from None
    index, rest = divmod(task - low, step)
    if rest or not 0 <= index < count:
        raise PreprocessError(
            f"Slurm array task {task} (min {low}, step {step}, count {count}) is not the k-th task of a regular "
            "range (an sbatch array with gaps?); set num_shards and shard_index explicitly", field="num_shards"
        )
    return count, index


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
    holdout: HoldoutRule = HoldoutRule()


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
    # Keyed by the shard's folder under the output: "{lang}", or "heldout/{lang}" for held-out documents.
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
                if job.holdout.held_out(lang, doc_hash(text)):
                    lang = f"{HELDOUT_DIR}/{lang}"  # no language has a "/": never a training folder
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
    def entries(held: bool) -> dict:
        root = os.path.join(cfg.output, HELDOUT_DIR) if held else cfg.output
        return {
            key.split("/", 1)[-1]: {
                "prefix": os.path.relpath(writers[key].prefix, root),
                "documents": st["documents"],
                "tokens": st["tokens"],
                "bytes": st["bytes"],
                "sources": sorted(st["sources"]),
                "max_token_id": writers[key].max_token_id,
            }
            for key, st in sorted(stats.items())
            if key.startswith(HELDOUT_DIR + "/") == held
        }

    marker = {
        "id": unit.id,
        "sort_key": unit.sort_key(),
        "segments": [s.to_json() for s in unit.segments],
        "shards": entries(held=False),
        "bad_input": log.files,
    }
    if cfg.holdout:  # prefixes relative to OUT/heldout, the held-out manifest's folder
        marker["heldout"] = entries(held=True)
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
        eta_s = format_eta(eta)
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
                "use a new output folder, or the tokenizer the folder was made with.", field="output"
            )
        if theirs["framing"] != ours["framing"]:
            raise PreprocessError(
                f"{cfg.output} was made with framing {theirs['framing']}, this run asks for {ours['framing']}; "
                "use a new output folder or the same framing (framing.bos, framing.eos)", field="output"
            )
    _write_json(state_path, ours)


def _load_markers(output: str) -> List[dict]:
    markers = []
    for path in sorted(glob.glob(os.path.join(output, STATE_DIR, "units", "*.json"))):
        with open(path, encoding="utf-8") as f:
            markers.append(json.load(f))
    return sorted(markers, key=lambda m: (m["sort_key"], m["id"]))


def _forget_units_with_missing_shards(output: str, markers: List[dict], only: Optional[set] = None) -> List[dict]:
    """A finished unit whose shard was deleted since is done again (its marker is removed). ``only``: the
    unit ids this process may touch (a shard task leaves the other tasks' units alone)."""
    kept = []
    for m in markers:
        if only is not None and m["id"] not in only:
            kept.append(m)
            continue
        missing = [sh["prefix"] for sh in m["shards"].values()
                   if not shard_finished(os.path.join(output, sh["prefix"]))]
        missing += [sh["prefix"] for sh in m.get("heldout", {}).values()
                    if not shard_finished(os.path.join(output, HELDOUT_DIR, sh["prefix"]))]
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
                        "another chunk_bytes, or the file changed since; adding it again would duplicate its "
                        "documents. Use a new output folder (or delete the output and start over).", field="output"
                    )


def _build_manifest(output: str, identity: TokenizerIdentity, dtype: str, markers: List[dict],
                    part: str = "shards") -> Manifest:
    """The manifest of the units' training shards (``part="shards"``, ``output`` the output folder) or of
    their held-out shards (``part="heldout"``, ``output`` the held-out folder)."""
    languages: Dict[str, LanguageEntry] = {}
    for m in markers:
        for lang, sh in m.get(part, {}).items():
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


def _remove_partials(output: str, prefix: str, unit_ids: Optional[List[str]] = None) -> None:
    """Remove what killed runs of ours left half-written, by name only and never through a link: the
    shard files ``{lang}/{prefix}-{unit}.{bin,idx}.partial`` (and under ``heldout/``), the manifests'
    ``manifest.json.partial`` and ``.preprocess/``'s atomic-write temporaries. ``unit_ids`` (a shard
    task, while other tasks write theirs): only those units' shard files."""
    ids = "|".join(re.escape(u) for u in unit_ids) if unit_ids is not None else "[0-9a-f]+"
    shard_partial = re.compile(rf"^{re.escape(prefix)}-({ids})\.(bin|idx)\.partial$")
    for root in (output, os.path.join(output, HELDOUT_DIR)):
        for folder in _real_subfolders(root):
            _remove_matching(folder, shard_partial)
    if unit_ids is not None:
        return
    _remove_matching(output, re.compile(rf"^{re.escape(MANIFEST_NAME)}\.partial$"))
    _remove_matching(os.path.join(output, HELDOUT_DIR), re.compile(rf"^{re.escape(MANIFEST_NAME)}\.partial$"))
    state_partial = re.compile(r"^.+\.partial-\d+$")  # fileio.atomic_write_text's temporaries
    for folder in (STATE_DIR, os.path.join(STATE_DIR, "units"), os.path.join(STATE_DIR, "holdout")):
        if _is_real_dir(os.path.join(output, folder)):
            _remove_matching(os.path.join(output, folder), state_partial)


def _is_real_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _real_subfolders(root: str) -> List[str]:
    """The folders directly in ``root`` that are folders themselves (a symlinked folder is not ours)."""
    if not _is_real_dir(root):
        return []
    with os.scandir(root) as it:
        return [e.path for e in it if e.is_dir(follow_symlinks=False)]


def _remove_matching(folder: str, pattern: "re.Pattern[str]") -> None:
    """Remove the regular files (not links) directly in ``folder`` whose names match ``pattern``."""
    if not _is_real_dir(folder):
        return
    with os.scandir(folder) as it:
        for e in it:
            if pattern.match(e.name) and e.is_file(follow_symlinks=False):
                os.remove(e.path)


def _open_lock(path: str) -> int:
    """A lock file of the output (never through a link, never truncated; see ``fileio.open_lock_file``)."""
    try:
        return open_lock_file(path)
    except LockFileRefused as exc:
        raise PreprocessError(str(exc), field="output") from None


def _is_preprocess_output(output: str) -> bool:
    """A folder a preprocess run made: its state folder, or (made before the state folder existed) a manifest."""
    if _is_real_dir(os.path.join(output, STATE_DIR)):
        return True
    manifest = os.path.join(output, MANIFEST_NAME)
    if os.path.isfile(manifest) and not os.path.islink(manifest):
        try:
            load_manifest(manifest)
            return True
        except Exception:  # noqa: BLE001 - anything unreadable is not ours
            return False
    return False


def check_output_folder(output: str, inputs: List[str]) -> None:
    """Refuse an output that is, holds or lies inside an input (its shards would be read back as input),
    and a non-empty folder that is not a previous output of preprocessing (its files are not ours to
    replace or clean up)."""
    real_out = os.path.realpath(output)
    for raw in inputs:
        real_in = os.path.realpath(raw)
        inside = real_out == real_in or real_out.startswith(real_in.rstrip(os.sep) + os.sep)
        holds = real_in.startswith(real_out.rstrip(os.sep) + os.sep)
        if inside or holds:
            where = "is the input" if real_out == real_in else ("lies inside the input" if inside else "holds the input")
            raise PreprocessError(
                f"output {output} {where} {raw}: its shards would be read back as input (or the input "
                "overwritten); choose an output folder outside every input", field="output"
            )
    if os.path.lexists(output) and not os.path.isdir(output):
        raise PreprocessError(f"output {output} exists and is not a folder; choose a new output folder", field="output")
    if os.path.isdir(output) and os.listdir(output) and not _is_preprocess_output(output):
        shown = sorted(os.listdir(output))
        raise PreprocessError(
            f"output {output} is a non-empty folder that no preprocess run made (no {STATE_DIR}/ or "
            f"{MANIFEST_NAME}; it holds {', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}); its files "
            "would be mixed with the shards: choose a new or empty output folder", field="output"
        )


def _refuse_other_shard_counts(output: str, num_shards: int) -> None:
    """Tasks of arrays with different shard counts would deal the same unit to two tasks at once."""
    for path in sorted(glob.glob(os.path.join(glob.escape(output), STATE_DIR, "lock.shard-*-of-*"))):
        if path.endswith(f"-of-{num_shards}"):
            continue
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PreprocessError(
                f"shard tasks with num_shards={path.rsplit('-of-', 1)[1]} are writing {output}; every task of "
                f"one output must use the same num_shards (this one has {num_shards})", field="num_shards"
            ) from None
        finally:
            os.close(fd)


def _check_finalize(units: List[WorkUnit], done: set, output: str) -> None:
    """Every unit of the plan must have its marker; name the missing ones and who owns them."""
    missing = [u for u in units if u.id not in done]
    if not missing:
        return
    owner = ""
    shards_path = os.path.join(output, STATE_DIR, "shards.json")
    num_shards = None
    if os.path.isfile(shards_path):
        with open(shards_path, encoding="utf-8") as f:
            num_shards = json.load(f).get("num_shards")
    assignment = assign_shards(units, num_shards) if num_shards else {}
    lines = []
    for u in sorted(missing, key=lambda u: (assignment.get(u.id, 0), u.sort_key()))[:10]:
        seg = u.segments[0]
        where = f"{seg.path}" + (f" [{seg.start}:{seg.end})" if seg.end >= 0 else "")
        who = f" (shard {assignment[u.id]} of {num_shards})" if u.id in assignment else ""
        more = f" +{len(u.segments) - 1} segment(s)" if len(u.segments) > 1 else ""
        lines.append(f"  unit {u.id}{who}: {where}{more}")
    shards = sorted({assignment[u.id] for u in missing if u.id in assignment})
    if shards:
        owner = (f"rerun the shard task(s) that own them (num_shards={num_shards}, shard_index="
                 f"{' / '.join(map(str, shards))}, same other options; they resume), or ")
    raise PreprocessError(
        f"finalize: {len(missing)} of {len(units)} unit(s) of the plan are not done:\n" + "\n".join(lines)
        + ("\n  ..." if len(missing) > 10 else "")
        + f"\n{owner}run once without num_shards/shard_index to do them in this process; then finalize again.",
        field="finalize",
    )


_FILE_LEVEL_KINDS = ("unreadable_file", "empty_language_folder")  # not records: no share of the input


def _bad_input_checks(cfg: PreprocessConfig, units: List[WorkUnit], markers: List[dict], report: BadInputLog,
                      whole_plan: bool) -> List[str]:
    """Messages for the ways the input is mostly bad (see ``max_bad_fraction``)."""
    errors = []
    docs = sum(sh["documents"] for m in markers for part in ("shards", "heldout") for sh in m.get(part, {}).values())
    bad = sum(n for e in report.files.values() for k, n in e["counts"].items() if k not in _FILE_LEVEL_KINDS)
    if whole_plan and cfg.max_bad_fraction < 1:
        yielded = {p for m in markers for part in ("shards", "heldout") for sh in m.get(part, {}).values()
                   for p in sh["sources"]}
        kinds = {seg.path: seg.kind for u in units for seg in u.segments}
        looked = f"text key {cfg.read.text_key!r}"
        if cfg.read.lang_key:
            looked += f" and language key {cfg.read.lang_key!r}"
        empty = [p for p in sorted(kinds) if p not in yielded]
        for path in empty[:10]:
            counts = report.files.get(path, {}).get("counts", {})
            why = ", ".join(f"{BAD_KINDS[k]}: {n}" for k, n in sorted(counts.items())) or "no records"
            keys = source_keys(path, kinds[path], cfg.read.split) if kinds[path] != "text" else None
            has = f"; its records have keys {keys}" if keys is not None else ""
            errors.append(f"{path} yielded no documents ({why}); looked for {looked}{has}. "
                          "Set read.text_key/read.lang_key to its fields, or remove it from inputs.")
        if len(empty) > 10:
            errors.append(f"... and {len(empty) - 10} more source(s) without documents")
        for raw in cfg.inputs:
            root = os.path.abspath(raw)
            if os.path.isdir(root) and not any(p == root or p.startswith(root + os.sep) for p in yielded):
                found = sum(1 for p in kinds if p == root or p.startswith(root + os.sep))
                errors.append(
                    f"input {raw} yielded no documents ({found} readable source file(s) under it; for a FineWeb2 "
                    f"folder, data/{{lang}}_{{Script}}/{cfg.read.split}/*.parquet; see the report above), looked "
                    f"for {looked}. Fix inputs/read.split/read.text_key, or remove it."
                )
    total = bad + docs
    if total and bad / total > cfg.max_bad_fraction:
        errors.append(
            f"{bad} of {total} records ({bad / total:.1%}) were bad and skipped, more than max_bad_fraction "
            f"{cfg.max_bad_fraction:g} (see the report above); fix the input or the options (e.g. read.text_key, "
            "read.lang_key), or raise max_bad_fraction to accept it. The shards already written are kept."
        )
    return errors


# ----------------------------------------------------------------------------------------------
# Entry point


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Preprocess ``cfg.inputs`` into ``cfg.output``; see the module docstring."""
    if not SAFE_NAME.match(cfg.prefix):  # the same rule as a folder name: no "/", "..", absolute paths
        raise PreprocessError(f"prefix {cfg.prefix!r}: give a plain file-name prefix (letters, digits, _ . -)",
                              field="prefix")
    if cfg.chunk_bytes < 1 or cfg.workers < 1 or cfg.batch_docs < 1:
        raise PreprocessError("chunk_bytes, workers and batch_docs must be positive")
    if not cfg.max_bad_fraction >= 0:
        raise PreprocessError(f"max_bad_fraction {cfg.max_bad_fraction}: give a fraction in [0, 1]",
                              field="max_bad_fraction")
    sharded = cfg.num_shards > 1
    index_ok = isinstance(cfg.shard_index, int) and 0 <= cfg.shard_index < cfg.num_shards
    if cfg.num_shards < 1 or (sharded and not index_ok):
        raise PreprocessError(f"num_shards {cfg.num_shards}, shard_index {cfg.shard_index}: give N >= 1 and "
                              "0 <= I < N (both, or neither)", field="shard_index")
    if not sharded and cfg.shard_index not in (None, 0):
        raise PreprocessError(f"shard_index {cfg.shard_index} needs num_shards above it", field="num_shards")
    if cfg.holdout_docs < 0 or not 0 <= cfg.holdout_fraction < 1:
        raise PreprocessError(f"holdout_docs {cfg.holdout_docs}, holdout_fraction {cfg.holdout_fraction}: give "
                              "N >= 0 documents per language, or a fraction in [0, 1)",
                              field="holdout_docs" if cfg.holdout_docs < 0 else "holdout_fraction")
    if cfg.holdout_docs and cfg.holdout_fraction:
        raise PreprocessError("holdout_docs and holdout_fraction are two ways to choose the held-out "
                              "documents: give one of them", field="holdout_fraction")
    if sharded and cfg.finalize:
        raise PreprocessError("finalize runs after all shard tasks: give it the same options without "
                              "num_shards/shard_index", field="finalize")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer_path = os.path.abspath(resolve_tokenizer_path(cfg.tokenizer))  # a Hub id: its snapshot, once
    cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output), tokenizer=tokenizer_path)
    tokenizer = load_tokenizer(cfg.tokenizer)
    identity = tokenizer.identity
    prefix_ids, suffix_ids = cfg.framing.ids(identity)
    if cfg.split_sentences:
        SentenceSplitter(cfg.nltk_language)  # fail now, not in every worker
    dtype = token_dtype(identity.vocab_size).name
    check_output_folder(cfg.output, cfg.inputs)
    os.makedirs(os.path.join(cfg.output, STATE_DIR), exist_ok=True)

    # One run (or finalize) holds the folder alone; shard tasks share it, each holding its own shard.
    lock = _open_lock(os.path.join(cfg.output, STATE_DIR, "lock"))
    shard_lock = None
    try:
        fcntl.flock(lock, (fcntl.LOCK_SH if sharded else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        if sharded:
            name = f"lock.shard-{cfg.shard_index}-of-{cfg.num_shards}"
            shard_lock = _open_lock(os.path.join(cfg.output, STATE_DIR, name))
            fcntl.flock(shard_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        if shard_lock is not None:
            os.close(shard_lock)
        what = f"shard {cfg.shard_index} of {cfg.num_shards} of " if sharded and shard_lock is not None else ""
        raise PreprocessError(f"another preprocess is writing {what}{cfg.output} (a one-process run or finalize "
                              "excludes shard tasks); wait for it to finish") from None
    try:
        if sharded:
            _refuse_other_shard_counts(cfg.output, cfg.num_shards)
        _check_output(cfg, identity, dtype)
        store_tokenizer(cfg.tokenizer, cfg.output)  # travels on: training copies it into every checkpoint
        plan_log = BadInputLog(strict=cfg.strict, max_locations=cfg.max_bad_locations)
        sources = discover(cfg.inputs, cfg.read, plan_log)
        segments = plan_segments(sources, cfg.chunk_bytes, cfg.read, plan_log)
        units = plan_units(segments, cfg.chunk_bytes, _fingerprint(cfg, identity))
        markers = _load_markers(cfg.output)
        _check_overlap(units, markers)
        mine = None  # unit ids this process may run and clean up (None: all)
        if sharded:
            assignment = assign_shards(units, cfg.num_shards)
            mine = {u.id for u in units if assignment[u.id] == cfg.shard_index}
            _write_json(os.path.join(cfg.output, STATE_DIR, "shards.json"), {"num_shards": cfg.num_shards})
        _remove_partials(cfg.output, cfg.prefix, sorted(mine) if mine is not None else None)
        markers = _forget_units_with_missing_shards(cfg.output, markers, mine)
        done = {m["id"] for m in markers}
        if cfg.finalize:
            _check_finalize(units, done, cfg.output)
        pending = [u for u in units if u.id not in done and (mine is None or u.id in mine)]
        # Biggest first: the tail of the run is not one large unit on one busy worker.
        pending.sort(key=lambda u: (-u.size, u.id))
        scope = f" ({len(mine)} in shard {cfg.shard_index} of {cfg.num_shards})" if sharded else ""
        ours = len(mine) if mine is not None else len(units)  # a shard task counts its own units only
        print(
            f"preprocess: {len(units)} units planned{scope}, {ours - len(pending)} already done, "
            f"{len(pending)} to run on {cfg.workers} worker(s); tokenizer {identity.name} "
            f"(vocab {identity.vocab_size}, {dtype})",
            file=sys.stderr,
            flush=True,
        )
        holdout = HoldoutRule()
        if cfg.holdout and pending:
            holdout = _holdout_rule(cfg, units, markers)
        job = _Job(cfg, dtype, tuple(prefix_ids), tuple(suffix_ids), holdout)
        progress = _Progress(sum(u.size for u in pending), len(pending), cfg.log_interval_s)
        if pending:
            _run_units(pending, job, cfg.workers, progress)
        markers = _load_markers(cfg.output)
        manifest = None
        if sharded:  # the manifest needs every shard's units: finalize writes it
            markers = [m for m in markers if m["id"] in mine]
        else:
            if cfg.holdout:
                check_heldout_share(markers)
            manifest = _build_manifest(cfg.output, identity, dtype, markers)
            if cfg.holdout:  # first: a training manifest beside it means the held-out one is there too
                heldout_dir = os.path.join(cfg.output, HELDOUT_DIR)
                os.makedirs(heldout_dir, exist_ok=True)
                write_manifest(_build_manifest(heldout_dir, identity, dtype, markers, part="heldout"),
                               os.path.join(heldout_dir, MANIFEST_NAME))
            write_manifest(manifest, os.path.join(cfg.output, MANIFEST_NAME))
    finally:
        if shard_lock is not None:
            os.close(shard_lock)
        os.close(lock)

    report = BadInputLog(max_locations=cfg.max_bad_locations)
    report.merge(plan_log.files)
    for m in markers:
        report.merge(m["bad_input"])
    print(report.report(), file=sys.stderr, flush=True)
    result = PreprocessResult(manifest, report, len(units), len(pending), len(mine) if sharded else None)
    errors = _bad_input_checks(cfg, units, markers, report, whole_plan=not sharded)
    if errors:
        raise BadInputFractionError("\n".join(errors), result)
    return result


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
