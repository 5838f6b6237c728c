"""The index of a schedule, from its cache or built (:func:`build_data_index`): the schedule planned,
its cache key computed, then the folder ``{cache_dir}/mmbert-index-{key}`` read (memory-mapped) when
it exists; otherwise one rank (global rank 0 by default, :func:`default_rank`) builds it into a
temporary folder published whole (``fileio.publish_new_directory``), while the others wait for it up
to a timeout and then fail naming the folder and the command that prebuilds it. Without a cache folder
the index is built on every caller through a temporary folder and read back whole."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import to_dict
from megatron_mmbert.data.index.arrays import DataIndex, assemble, load_arrays
from megatron_mmbert.data.index.build import build_arrays, default_threads
from megatron_mmbert.data.index.digests import cache_folder_name, cache_key
from megatron_mmbert.data.index.packing import check_bin_rows, check_packing
from megatron_mmbert.data.index.plan import PLAN_FILE, index_plan, write_index_plan
from megatron_mmbert.data.schedule import PhasePlan, plan_schedule
from megatron_mmbert.fileio import atomic_write_json, publish_new_directory

DESCRIPTION_FILE = "description.json"
"""What the cache folder was built from (key, languages, phases, seed, packing), for a reader of the folder."""


def default_rank() -> int:
    """Global rank: torch.distributed when initialised, else ``$RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def _say(msg: str) -> None:
    """One line of what the build does (the progress of its stages: ``progress.Progress``)."""
    print(f"[build_data_index] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Schedule:
    """A planned schedule and everything its index depends on (the cache key hashes it)."""

    manifest: object
    phases: List[PhaseConfig]
    plans: List[PhasePlan]
    seed: int
    start_phase: int
    packing: str
    groups: List[int]
    threads: int
    key: str

    def build(self, folder: str) -> Dict[str, np.ndarray]:
        """Every array into ``folder``; returns the small ones (:func:`build_arrays`)."""
        return build_arrays(self.manifest, self.plans, self.seed, folder, self.start_phase, self.packing,
                            self.groups, self.threads)

    def describe(self, arrays) -> Dict:
        """The plan of the index from its small arrays (:func:`index_plan`)."""
        K = len(self.plans)
        counts = np.stack([np.asarray(arrays[f"phase{k}_counts"]) for k in range(K)])
        stats = [np.asarray(arrays[f"phase{k}_packing_stats"]) for k in range(K)]
        return index_plan(self.manifest, self.plans, counts, self.seed, self.start_phase, self.key,
                          np.asarray(arrays["stream_positions"]), self.packing, stats, self.groups)

    def assemble(self, arrays, path: str, plan_json: Dict) -> DataIndex:
        return assemble(self.plans, arrays, path, plan_json, self.start_phase, self.packing, self.groups)

    def write_description(self, folder: str) -> None:
        atomic_write_json(os.path.join(folder, DESCRIPTION_FILE),
                          {"key": self.key, "languages": self.plans[0].languages, "start_phase": self.start_phase,
                           "packing": self.packing, "bin_rows": self.groups,
                           "phases": [to_dict(p) for p in self.phases], "seed": self.seed},
                          indent=1, sort_keys=False)


def build_data_index(
    manifest,
    phases: Sequence[PhaseConfig],
    seed: int,
    cache_dir: Optional[str],
    default_global_batch_size: Optional[int] = None,
    anneal_segments: int = 64,
    is_builder: Optional[bool] = None,
    timeout: float = 3600.0,
    poll_interval: float = 1.0,
    start_phase: int = 0,
    packing: str = "concat",
    bin_rows: Optional[Sequence[int]] = None,
    threads: int = 0,
) -> DataIndex:
    """The schedule's index, from the cache when present; built (by ``is_builder``, default global
    rank 0) otherwise, while the other ranks wait up to ``timeout`` seconds.

    ``manifest`` is a ``megatron_mmbert.data.shards.Manifest``. ``cache_dir=None`` builds in memory
    on every caller (tests, tiny runs). ``start_phase``: the first phase the run reads (see the
    package docstring, "Branches"). Phases naming their own manifest read it as separate streams
    (``data.shards.phase_sources``). ``packing``: ``concat`` or ``best_fit`` (package docstring).
    ``bin_rows``: best_fit's ``seq_len`` rows per packed row, one per phase (None: 1, rows of
    ``seq_len``; a run passes its micro-batch sizes under ``data.packed_row: micro_batch``).
    ``threads``: languages packed at once by the builder (0: :func:`default_threads`); the arrays do
    not depend on it.
    """
    from megatron_mmbert.data.shards import phase_sources

    check_packing(packing)
    threads = int(threads) if threads else default_threads()
    manifest, phases = phase_sources(manifest, phases)
    tokens = {lang: e.tokens for lang, e in manifest.languages.items()}
    plans = plan_schedule(list(phases), tokens, default_global_batch_size, anneal_segments)
    if not 0 <= start_phase < len(plans):
        raise ValueError(f"start_phase {start_phase} outside the schedule's {len(plans)} phases")
    groups = check_bin_rows(plans, bin_rows if packing == "best_fit" else None)
    key = cache_key(manifest, phases, seed, default_global_batch_size, anneal_segments, start_phase, packing,
                    groups)
    schedule = _Schedule(manifest, list(phases), plans, seed, start_phase, packing, groups, threads, key)
    if cache_dir is None:
        return _build_in_memory(schedule)
    final = os.path.join(os.path.abspath(cache_dir), cache_folder_name(key))
    if is_builder is None:
        is_builder = default_rank() == 0
    if not os.path.isdir(final):
        if is_builder:
            _build_and_publish(schedule, cache_dir, final)
        else:
            _wait_for_builder(final, cache_dir, seed, packing, timeout, poll_interval)
    return _load(schedule, final)


def _build_in_memory(schedule: _Schedule) -> DataIndex:
    """Built through a temporary folder (the one build path), then read whole."""
    with tempfile.TemporaryDirectory(prefix="mmbert-index-") as tmp:
        small = schedule.build(tmp)
        arrays = load_arrays(tmp, len(schedule.plans), mmap=False)
    return schedule.assemble(arrays, "", schedule.describe(small))


def _build_and_publish(schedule: _Schedule, cache_dir: str, final: str) -> None:
    """Build into a temporary folder beside ``final`` and publish it whole (a concurrent builder that
    published first wins: same key, same content); a failed build leaves nothing behind."""
    os.makedirs(cache_dir, exist_ok=True)
    _say(f"cache miss: building {final}")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=cache_dir)
    try:
        small = schedule.build(tmp)
        schedule.write_description(tmp)
        write_index_plan(schedule.describe(small), tmp)
        publish_new_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _wait_for_builder(final: str, cache_dir: str, seed: int, packing: str, timeout: float,
                      poll_interval: float) -> None:
    """Poll for the folder the builder publishes; TimeoutError naming it and the prebuild command."""
    deadline = time.time() + timeout
    while not os.path.isdir(final):
        if time.time() > deadline:
            raise TimeoutError(
                f"waited {timeout:.0f}s for the data index {final} that rank 0 builds; it did not "
                "appear. Check rank 0's log, or prebuild it before launch with "
                "`python tools/build_data_index.py --config RUN.yaml` plus the run's own --a.b overrides "
                f"(the same manifest, phases, data seed {seed}, data.packing {packing} and cache folder "
                f"{cache_dir}: give a phase list --manifest, --cache_dir, --seed and --packing instead)"
            )
        time.sleep(poll_interval)


def _load(schedule: _Schedule, final: str) -> DataIndex:
    """The published index in ``final``: its arrays memory-mapped, its plan read."""
    arrays = load_arrays(final, len(schedule.plans), mmap=True)
    with open(os.path.join(final, PLAN_FILE)) as f:
        plan_json = json.load(f)
    return schedule.assemble(arrays, final, plan_json)


__all__ = ["DESCRIPTION_FILE", "default_rank", "build_data_index"]
