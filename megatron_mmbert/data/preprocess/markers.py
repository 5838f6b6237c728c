"""Resume: a unit is done iff its marker ``OUT/.preprocess/units/{id}.json`` exists.

A worker writes the marker (:func:`write_marker`: the unit's segments, its shards' prefixes and counts,
its bad-input report) atomically, after its shards. A run reads them all back (:func:`load_markers`),
does a finished unit whose shard was deleted since again (:func:`forget_units_with_missing_shards`), and
refuses input that overlaps a finished unit under other options (:func:`check_overlap`). The manifests
are built from the markers (``finalize.py``), so they never name a shard of an unfinished unit.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Dict, List, Optional, Tuple

from megatron_mmbert.data.preprocess import layout
from megatron_mmbert.data.preprocess.errors import PreprocessError
from megatron_mmbert.data.preprocess.units import WorkUnit
from megatron_mmbert.data.shards import HELDOUT_DIR, shard_finished
from megatron_mmbert.data.sources import Segment


def write_marker(output: str, unit: WorkUnit, shards: dict, bad_input: dict, heldout: Optional[dict] = None
                 ) -> dict:
    """Mark ``unit`` done: ``shards`` (language -> prefix relative to the output, documents, tokens, bytes,
    sources, max_token_id), ``heldout`` the same for its held-out shards (prefixes relative to
    ``OUT/heldout``, the held-out manifest's folder; None when not holding out). Returns the marker."""
    marker = {
        "id": unit.id,
        "sort_key": unit.sort_key(),
        "segments": [s.to_json() for s in unit.segments],
        "shards": shards,
        "bad_input": bad_input,
    }
    if heldout is not None:
        marker["heldout"] = heldout
    layout.write_json(layout.marker_path(output, unit.id), marker)
    return marker


def load_markers(output: str) -> List[dict]:
    """Every finished unit's marker, in plan order (first segment's path and start)."""
    markers = [layout.read_json(path)
               for path in sorted(glob.glob(os.path.join(glob.escape(output), layout.UNITS_DIR, "*.json")))]
    return sorted(markers, key=lambda m: (m["sort_key"], m["id"]))


def forget_units_with_missing_shards(output: str, markers: List[dict], only: Optional[set] = None) -> List[dict]:
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
            os.remove(layout.marker_path(output, m["id"]))
        else:
            kept.append(m)
    return kept


def check_overlap(units: List[WorkUnit], markers: List[dict]) -> None:
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
