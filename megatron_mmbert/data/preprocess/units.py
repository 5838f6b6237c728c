"""Work units: the plan of a run, cut from the input's segments.

A unit is segments of input that one worker turns into one shard per language. Consecutive small
segments of one fixed language are packed into one unit of at most ``chunk_bytes``; a unit's id hashes
its segments (path, range, size, mtime) and every option that changes its tokens
(:func:`unit_fingerprint`), so the plan and the shard names depend on the inputs only, never on the
worker count, the shard tasks or the scheduling order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import List, Tuple

from megatron_mmbert.data.preprocess.config import PreprocessConfig
from megatron_mmbert.data.preprocess.holdout import HASH_RULE
from megatron_mmbert.data.shards import TokenizerIdentity
from megatron_mmbert.data.sources import Segment


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


def unit_fingerprint(cfg: PreprocessConfig, identity: TokenizerIdentity) -> str:
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
