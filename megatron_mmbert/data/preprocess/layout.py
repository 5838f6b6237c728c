"""The names of a preprocessing output's own state files, ``OUT/.preprocess/``, and their writer.

Every module of the run finds its state files here: the tokenizer/framing record (``state.json``), one
marker per finished unit (``units/{id}.json``), the held-out pass's per-unit scans (``holdout/{id}.json``)
and selection (``holdout.json``), the Slurm array's shard count (``shards.json``) and the lock files
(``lock``, ``lock.shard-{i}-of-{n}``). The shards and manifests themselves are named in ``data/shards.py``.
"""

from __future__ import annotations

import json
import os

from megatron_mmbert.fileio import atomic_write_json

STATE_DIR = ".preprocess"
"""The run's state folder inside the output: its presence marks a folder a preprocess run made."""
UNITS_DIR = os.path.join(STATE_DIR, "units")
"""Unit markers: a unit is done iff its marker exists."""
SCANS_DIR = os.path.join(STATE_DIR, "holdout")
"""The held-out pass's cached per-unit scans."""


def state_path(output: str, name: str) -> str:
    """``OUT/.preprocess/{name}`` (``state.json``, ``holdout.json``, ``shards.json``, ``lock``...)."""
    return os.path.join(output, STATE_DIR, name)


def marker_path(output: str, unit_id: str) -> str:
    """The marker of unit ``unit_id``."""
    return os.path.join(output, UNITS_DIR, f"{unit_id}.json")


def scan_path(output: str, unit_id: str) -> str:
    """The held-out pass's scan of unit ``unit_id``."""
    return os.path.join(output, SCANS_DIR, f"{unit_id}.json")


def shard_lock_name(shard_index: int, num_shards: int) -> str:
    """The lock file name of one shard task of a Slurm array."""
    return f"lock.shard-{shard_index}-of-{num_shards}"


def read_json(path: str):
    """A state file's contents."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write a state file atomically (non-ASCII text kept as is)."""
    atomic_write_json(path, obj, ensure_ascii=False)
