"""Preemption that saves, with a real torchrun on CPU (two gloo workers), for every way the signal
arrives: SIGTERM to the torchrun agent, SIGTERM to the launcher's process group (``kill -- -PGID``;
torchrun starts each worker in a session of its own and signals that whole group), SIGUSR1 through the shipped launcher (Slurm's ``--signal``; the sbatch
scripts themselves start one srun task per GPU, which Slurm signals directly), and SIGKILL of the agent. Each must end with a complete, verified checkpoint that
``latest`` points at and no process left behind -- also when the trainers save asynchronously
(``checkpoint.async_save``, the process-group case).

Before the fix, torchrun's SIGTERM to each worker's process group also killed the
``multiprocessing`` Manager that megatron-core's ``FileSystemWriterAsync`` had spawned (in that
group) at the first save: the next save died with
``EOFError``/``BrokenPipeError`` and no checkpoint (see megatron_mmbert/checkpoints/dcp_io.py).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import ROOT, free_port, subprocess_env
from tests.helpers.training import tiny_run_config, write_manifest

pytestmark = pytest.mark.slow

LONG_PHASE = {
    "phases": [{"name": "pretrain", "tokens": 204800, "seq_len": 64, "mask_rate": 0.3, "languages": "all",
                "temperature": 0.7}],
    "schedule": {"total_tokens": 204800, "phases": {"pretrain": {"lr": 1.0e-3, "warmup_tokens": 128}}},
    "checkpoint": {"every_steps": 1, "keep_last": 2},  # the writer runs before the signal, too
}


def _start(tmp_path, how, async_save=False):
    sections = {**LONG_PHASE, "checkpoint": {**LONG_PHASE["checkpoint"], "async_save": async_save}}
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), write_manifest(tmp_path / "data"), str(tmp_path / "run"),
                          **sections)
    port = ["--nproc_per_node", "2", "--master_port", str(free_port())]
    env = subprocess_env()
    if how == "launcher":
        env.update(PYTHON=sys.executable, TORCHRUN_ARGS=" ".join(port), SHUTDOWN_TIMEOUT_S="120")
        cmd = ["bash", os.path.join(ROOT, "examples", "launch_resumable.sh"), cfg]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", *port, os.path.join(ROOT, "pretrain_mmbert.py"),
               "--config", cfg]
    log = open(tmp_path / "out.txt", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # until two steps are done (a periodic save already happened)
        if metrics.exists() and sum('"kind": "train"' in l for l in metrics.read_text().splitlines()) >= 2:
            return proc, log
        assert proc.poll() is None, open(tmp_path / "out.txt").read()[-3000:]
        time.sleep(0.3)
    raise AssertionError("training did not start")


def _descendants(pid):
    """Every process below ``pid`` (torchrun starts each worker in its own session, so the
    launcher's process group does not cover them)."""
    found, frontier = [], [pid]
    while frontier:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", ",".join(map(str, frontier))],
                             capture_output=True, text=True).stdout.split()
        frontier = [int(p) for p in out]
        found += frontier
    return found


def _all_gone(pids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split(")")[-1].split()[0] != "Z"]
        if not alive:
            return True
        time.sleep(0.3)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    return False


def _check_saved(tmp_path):
    from megatron_mmbert.checkpoints.dist import read_latest, verify_checkpoint

    latest = read_latest(str(tmp_path / "run" / "checkpoints"))
    verify_checkpoint(latest)
    meta = json.load(open(os.path.join(latest, "mmbert_config.json")))
    records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    last_step = max(r["step"] for r in records if r["kind"] == "train")
    assert meta["train_state"]["step"] == last_step  # the state at the stop, not an older save
    out = open(tmp_path / "out.txt").read()
    assert "stopping cleanly" in out
    assert "BrokenPipeError" not in out and "EOFError" not in out


@pytest.mark.parametrize("how", ["agent", "group", "launcher"])
def test_signal_ends_in_a_complete_checkpoint(tmp_path, how):
    """``group``: the trainers save asynchronously (``checkpoint.async_save``; with a save every step,
    one is being written in the background when the signal comes): the stop still ends published."""
    proc, _ = _start(tmp_path, how, async_save=how == "group")
    tree = _descendants(proc.pid)
    if how == "agent":
        os.kill(proc.pid, signal.SIGTERM)
    elif how == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGUSR1)
    rc = proc.wait(timeout=240)
    assert _all_gone(tree, 60), "processes left behind"
    _check_saved(tmp_path)
    if how == "group":
        assert "asynchronously: the step waited" in open(tmp_path / "out.txt").read()
    # torchrun itself exits 1 after forwarding a signal; the launcher turns a saved stop into 0
    assert rc == (0 if how == "launcher" else 1)


def test_group_sigterm_through_the_launcher_exits_0(tmp_path):
    proc, _ = _start(tmp_path, "launcher")
    tree = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=240) == 0
    assert _all_gone(tree, 60)
    _check_saved(tmp_path)


def test_sigkill_of_torchrun_leaves_no_orphans(tmp_path):
    proc, _ = _start(tmp_path, "torchrun")
    workers = _descendants(proc.pid)
    assert len(workers) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _all_gone(workers, 120), "trainers outlived their torchrun agent"
    _check_saved(tmp_path)  # they got SIGTERM from the kernel (PR_SET_PDEATHSIG) and saved first
