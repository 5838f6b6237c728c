"""The index cache's key: sha256 over everything the index arrays depend on (:func:`cache_key`;
the folder is ``{cache_dir}/mmbert-index-{key[:20]}``), the builder's version in it
(:data:`INDEX_VERSION`), and the manifests' content digests the plan and checkpoints record
(:func:`manifest_digest`, :func:`source_digests`)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Sequence

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import to_dict
from megatron_mmbert.data.index.packing import (
    BEST_FIT_BUFFER,
    BEST_FIT_LOOKAHEAD_ROWS,
    BEST_FIT_MIN_PIECE,
    BEST_FIT_WINDOW_ROWS,
)

INDEX_VERSION = 4
"""Bumped whenever the builder's output for the same inputs changes (part of the cache key)."""


def cache_folder_name(key: str) -> str:
    """The cache folder of the index with ``key`` (inside ``cache_dir``)."""
    return f"mmbert-index-{key[:20]}"


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


__all__ = ["INDEX_VERSION", "cache_key", "cache_folder_name", "manifest_digest", "source_digests"]
