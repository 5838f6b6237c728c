"""Many nodes: the unit plan dealt out to the tasks of a Slurm array.

The plan is the same in every process, so ``num_shards``/``shard_index`` (read from
``SLURM_ARRAY_TASK_*`` when set: :func:`slurm_array_shard`) deal its units out to N tasks
(:func:`assign_shards`: biggest first, each to the least-loaded shard). A shard task runs only its units
and writes no manifest; ``finalize`` writes it once all are done (``finalize.py``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from megatron_mmbert.data.preprocess.errors import PreprocessError
from megatron_mmbert.data.preprocess.units import WorkUnit


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
