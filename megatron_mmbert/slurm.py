"""What a run learns from its Slurm job's environment (no ``squeue``/``scontrol`` calls): its rank
(:func:`torch_env_from_slurm`, one srun task per GPU) and its time limit.

Slurm (23.02 and later) exports ``SLURM_JOB_END_TIME``, the Unix time at which the job's time limit
ends it; for older Slurm (22.05, tested) the sbatch scripts read it once per job from ``squeue -h -j
$SLURM_JOB_ID -o %e`` (or ``scontrol show job``) and export it, so no task here asks the controller.
A run that sets no ``checkpoint.exit_after_minutes`` of its own gets one derived from it at
config resolution (:func:`megatron_mmbert.training.config.load_config`): stop cleanly, with a
checkpoint, ``checkpoint.job_end_margin_minutes`` before the end. ``--signal=USR1@180`` in the
sbatch scripts is the second line of defence (a time limit extended or shortened after the start).
"""

from __future__ import annotations

import os
import re
import time
from typing import Dict, Mapping, Optional

from megatron_mmbert.config_base import ConfigError


def job_minutes_left(env: Optional[Mapping[str, str]] = None, now: Optional[float] = None) -> Optional[float]:
    """Minutes until the job's time limit (``SLURM_JOB_END_TIME``), or None outside a Slurm job
    with a known end."""
    env = os.environ if env is None else env
    end = env.get("SLURM_JOB_END_TIME", "").strip()
    if not end.isdigit() or int(end) == 0:
        return None
    return (int(end) - (time.time() if now is None else now)) / 60.0


def exit_after_minutes_for_job(margin_minutes: float, env: Optional[Mapping[str, str]] = None,
                               now: Optional[float] = None) -> Optional[float]:
    """``checkpoint.exit_after_minutes`` for a run starting ``now`` in this job: the time left minus
    ``margin_minutes`` (what the last step and the save need), at least 0 (stop after one step)."""
    left = job_minutes_left(env, now)
    if left is None:
        return None
    return max(0.0, round(left - margin_minutes, 2))


def torch_env_from_slurm(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """torch.distributed's ``env://`` variables for one srun task per GPU: ``RANK`` from
    ``SLURM_PROCID``, ``LOCAL_RANK`` from ``SLURM_LOCALID``, ``WORLD_SIZE`` from ``SLURM_NTASKS``
    (``mmbert-pretrain --slurm-task``). ``MASTER_ADDR`` / ``MASTER_PORT`` come from the batch script."""
    env = os.environ if env is None else env
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS") if not env.get(k, "").isdigit()]
    if missing:
        raise ConfigError(f"one process per Slurm task: {', '.join(missing)} not set; start it with srun inside a Slurm job "
                          "(examples/slurm/pretrain.sbatch), or launch with torchrun instead")
    if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT", "").isdigit():
        raise ConfigError("one process per Slurm task: export MASTER_ADDR (the first node) and MASTER_PORT before srun, "
                          "as examples/slurm/pretrain.sbatch does")
    out = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"]}
    per_node = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or "")
    if per_node:
        out["LOCAL_WORLD_SIZE"] = per_node.group(0)
    return out
