"""The end of a run: the manifests built from the unit markers, the bad-input report and its checks, and
the ``finalize`` job's check that every unit of the plan is done.

The manifest is rebuilt from all unit markers (this run's and earlier runs') and written atomically --
the held-out one first, so a training manifest beside it means the held-out one is there too. A shard
task writes none: ``finalize`` (the same options, no shard fields) runs no unit, checks that every unit
has its marker (naming the missing ones and the shard task that owns each) and writes the manifest, the
same bytes a one-process run writes. Input that is mostly bad is an error raised after the manifest and
the report are written (``BadInputFractionError``), so nothing done is lost.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from megatron_mmbert.data.preprocess import layout
from megatron_mmbert.data.preprocess.config import PreprocessConfig
from megatron_mmbert.data.preprocess.errors import PreprocessError
from megatron_mmbert.data.preprocess.sharding import assign_shards
from megatron_mmbert.data.preprocess.units import WorkUnit
from megatron_mmbert.data.shards import (
    HELDOUT_DIR, MANIFEST_NAME, DocumentFraming, LanguageEntry, Manifest, TokenizerIdentity, write_manifest,
)
from megatron_mmbert.data.sources import BAD_KINDS, BadInputLog, source_keys


def check_finalize(units: List[WorkUnit], done: set, output: str) -> None:
    """Every unit of the plan must have its marker; name the missing ones and who owns them."""
    missing = [u for u in units if u.id not in done]
    if not missing:
        return
    owner = ""
    shards_path = layout.state_path(output, "shards.json")
    num_shards = layout.read_json(shards_path).get("num_shards") if os.path.isfile(shards_path) else None
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


def build_manifest(output: str, identity: TokenizerIdentity, dtype: str, markers: List[dict],
                   part: str = "shards") -> Manifest:
    """The manifest of the units' training shards (``part="shards"``, ``output`` the output folder) or of
    their held-out shards (``part="heldout"``, ``output`` the held-out folder)."""
    languages: Dict[str, LanguageEntry] = {}
    framings: Dict[str, list] = {}
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
            framings.setdefault(lang, []).append(sh.get("framing"))
    for lang, counted in framings.items():
        languages[lang].framing = _language_framing(counted)
    return Manifest(identity, dtype, languages, root=os.path.abspath(output))


def _language_framing(shards: List[Optional[dict]]) -> Optional[DocumentFraming]:
    """The language's ``framing`` record: its shards' counts summed, when every shard counted the same
    ``<bos>`` / ``<eos>`` ids (None when a unit was written before they were counted)."""
    if not shards or any(sh is None for sh in shards):
        return None
    each = [DocumentFraming.from_json(sh) for sh in shards]
    if len({(f.bos, f.eos) for f in each}) != 1:
        return None
    return DocumentFraming(each[0].bos, each[0].eos, sum(f.starts_bos for f in each), sum(f.ends_eos for f in each))


def write_manifests(output: str, identity: TokenizerIdentity, dtype: str, markers: List[dict], holdout: bool
                    ) -> Manifest:
    """Write ``OUT/manifest.json`` (and first, with ``holdout``, ``OUT/heldout/manifest.json``) from the
    markers; returns the training manifest."""
    manifest = build_manifest(output, identity, dtype, markers)
    if holdout:  # first: a training manifest beside it means the held-out one is there too
        heldout_dir = os.path.join(output, HELDOUT_DIR)
        os.makedirs(heldout_dir, exist_ok=True)
        write_manifest(build_manifest(heldout_dir, identity, dtype, markers, part="heldout"),
                       os.path.join(heldout_dir, MANIFEST_NAME))
    write_manifest(manifest, os.path.join(output, MANIFEST_NAME))
    return manifest


def bad_input_report(cfg: PreprocessConfig, plan_log: BadInputLog, markers: List[dict]) -> BadInputLog:
    """Bad input over the planning (discovery) and every unit's marker (earlier runs' included)."""
    report = BadInputLog(max_locations=cfg.max_bad_locations)
    report.merge(plan_log.files)
    for m in markers:
        report.merge(m["bad_input"])
    return report


_FILE_LEVEL_KINDS = ("unreadable_file", "empty_language_folder")  # not records: no share of the input


def bad_input_checks(cfg: PreprocessConfig, units: List[WorkUnit], markers: List[dict], report: BadInputLog,
                     whole_plan: bool) -> List[str]:
    """Messages for the ways the input is mostly bad (see ``max_bad_fraction``): sources (and input
    folders) that yielded no document, when ``whole_plan``; too large a share of bad records."""
    errors = _sources_without_documents(cfg, units, markers, report) if whole_plan and cfg.max_bad_fraction < 1 else []
    docs = sum(sh["documents"] for m in markers for part in ("shards", "heldout") for sh in m.get(part, {}).values())
    bad = sum(n for e in report.files.values() for k, n in e["counts"].items() if k not in _FILE_LEVEL_KINDS)
    total = bad + docs
    if total and bad / total > cfg.max_bad_fraction:
        errors.append(
            f"{bad} of {total} records ({bad / total:.1%}) were bad and skipped, more than max_bad_fraction "
            f"{cfg.max_bad_fraction:g} (see the report above); fix the input or the options (e.g. read.text_key, "
            "read.lang_key), or raise max_bad_fraction to accept it. The shards already written are kept."
        )
    return errors


def _sources_without_documents(cfg: PreprocessConfig, units: List[WorkUnit], markers: List[dict],
                               report: BadInputLog) -> List[str]:
    """A message per source file and per ``inputs`` folder of the plan that yielded no document."""
    errors = []
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
    return errors
