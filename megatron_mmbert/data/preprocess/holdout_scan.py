"""The ``holdout_docs`` pass: read every unit once without tokenizing, keep its candidates, select, record.

Each unit's scan (:func:`scan_unit`: per language its N smallest document hashes with their counts, and
its document count) runs in the workers and is cached in ``OUT/.preprocess/holdout/{unit}.json``, so a
rerun or another shard task does not read it again. The selection is made from the union of the scans
(``holdout.select_heldout``) and recorded in ``OUT/.preprocess/holdout.json``; a rerun that would select
differently (inputs added) while units are done is refused. ``holdout_fraction`` needs no pass.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

from megatron_mmbert.data.preprocess import layout
from megatron_mmbert.data.preprocess.config import PreprocessConfig
from megatron_mmbert.data.preprocess.errors import PreprocessError
from megatron_mmbert.data.preprocess.holdout import HASH_RULE, HoldoutRule, doc_hash, select_heldout
from megatron_mmbert.data.preprocess.pool import map_unordered
from megatron_mmbert.data.preprocess.units import WorkUnit
from megatron_mmbert.data.sources import BadInputLog, read_segment
from megatron_mmbert.progress import Progress

_SCAN: dict = {}  # per-process: the config the scanner reads with, set by _init_scanner


def _init_scanner(cfg: PreprocessConfig) -> None:
    _SCAN.clear()
    _SCAN["cfg"] = cfg


def scan_unit(unit: WorkUnit) -> dict:
    """A unit's ``holdout_docs`` candidates: per language its N smallest distinct hashes with the number of
    documents of each, and its document count (bad records are skipped here and reported by the unit's
    real run). A hash among a language's N smallest overall is among every unit's N smallest, so summing
    the units' counts gives its exact count."""
    cfg: PreprocessConfig = _SCAN["cfg"]
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


def holdout_rule(cfg: PreprocessConfig, units: List[WorkUnit], markers: List[dict]) -> HoldoutRule:
    """The held-out selection of this plan (scanning the units not scanned before), checked against the one
    the output's finished units were made with."""
    if not cfg.holdout_docs:
        return HoldoutRule(fraction=cfg.holdout_fraction)
    scans = _scans(cfg, units)
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
    _record_selection(cfg, units, markers, selection)
    return HoldoutRule(hashes=frozenset(h for hs in selection.values() for h in hs))


def _scans(cfg: PreprocessConfig, units: List[WorkUnit]) -> Dict[str, dict]:
    """unit id -> its scan: the cached ones read, the others made now (in the workers) and cached."""
    scans: Dict[str, dict] = {}
    for u in units:
        path = layout.scan_path(cfg.output, u.id)
        if os.path.isfile(path):
            scans[u.id] = layout.read_json(path)
    todo = sorted((u for u in units if u.id not in scans), key=lambda u: (-u.size, u.id))
    if not todo:
        return scans
    print(f"preprocess: held-out selection: reading {len(todo)} of {len(units)} unit(s) for their document "
          f"hashes on {cfg.workers} worker(s)", file=sys.stderr, flush=True)
    progress = Progress("preprocess", len(todo), "units", sys.stderr, every_s=cfg.log_interval_s)
    try:
        for scan in map_unordered(scan_unit, todo, cfg.workers, _init_scanner, (cfg,)):
            scans[scan["id"]] = scan
            layout.write_json(layout.scan_path(cfg.output, scan["id"]), scan)
            progress.advance(1, "held-out selection")
    finally:
        _SCAN.clear()
    return scans


def _record_selection(cfg: PreprocessConfig, units: List[WorkUnit], markers: List[dict],
                      selection: Dict[str, List[str]]) -> None:
    """Record the selection; refuse one that differs from the selection finished units were made with."""
    path = layout.state_path(cfg.output, "holdout.json")
    if os.path.isfile(path):
        before = layout.read_json(path)
        if before.get("languages") != selection and any("heldout" in m for m in markers):
            raise PreprocessError(
                f"{cfg.output}: the held-out selection of these inputs (the {cfg.holdout_docs} smallest document "
                "hashes per language) differs from the one its finished units were made with (inputs added or "
                "changed since?); their training shards would hold documents now held out. Use a new output folder.",
                field="output",
            )
    layout.write_json(path, {"holdout_docs": cfg.holdout_docs, "hash": HASH_RULE,
                             "units": sorted(u.id for u in units), "languages": selection})
