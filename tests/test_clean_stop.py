"""A job that stops cleanly: SIGTERM at the torchrun agent (what a scheduler or ``kill`` sends)
through ``examples/launch_resumable.sh`` ends in a checkpoint and exit 0, and the rerun of the same
command resumes bitwise (the weights equal an uninterrupted run's, every step's loss repeats). The
Slurm scripts' layout, one process per task with Slurm's task variables (``--slurm-task``), each
getting SIGUSR1 as ``--signal=USR1@180`` delivers it, saves and exits 0. And
``checkpoint.exit_after_minutes`` follows a Slurm job's time limit (``SLURM_JOB_END_TIME``)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import ROOT, check, free_port, launch, subprocess_env
from tests.helpers.training import compare_checkpoints, tiny_run_config, write_manifest

STEPS = 24
ONE_PHASE = {  # 24 x 8 rows x 64 tokens (25 steps: the first two take 4 rows); a save every 4 steps
    "phases": [{"name": "pretrain", "tokens": STEPS * 8 * 64, "seq_len": 64, "mask_rate": 0.3,
                "languages": "all", "temperature": 0.7}],
    "schedule": {"total_tokens": STEPS * 8 * 64, "phases": {"pretrain": {"lr": 1.0e-3, "warmup_tokens": 256}}},
    "checkpoint": {"every_steps": 4, "keep_last": 20},
    "logging": {"interval": 1, "eval_rows_per_language": 2, "tensorboard": False},
}


def _losses(run_dir):
    import json

    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        if r["kind"] == "train":
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def _is_complete(cfg):
    return subprocess.run([sys.executable, "-m", "megatron_mmbert.pretrain", "--config", cfg, "--is-complete"],
                          env=subprocess_env(), capture_output=True, timeout=120, cwd=ROOT).returncode


@pytest.mark.slow
def test_sigterm_at_the_torchrun_agent_saves_exits_0_and_resumes_bitwise(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    ref_cfg = tiny_run_config(str(tmp_path / "ref.yaml"), manifest, str(tmp_path / "ref"), **ONE_PHASE)
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), manifest, str(tmp_path / "run"), **ONE_PHASE)
    env = dict(subprocess_env(), PYTHON=sys.executable, SHUTDOWN_TIMEOUT_S="120",
               TORCHRUN_ARGS=f"--nproc_per_node 1 --master_port {free_port()}")
    out = open(tmp_path / "out.txt", "w+")
    launcher = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "launch_resumable.sh"), cfg], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):
        assert launcher.poll() is None and time.time() < deadline, open(tmp_path / "out.txt").read()[-3000:]
        time.sleep(0.1)
    agent = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid), "-f", "torch.distributed.run"],
                                            capture_output=True, text=True).stdout.split()]
    assert len(agent) == 1, agent
    os.kill(agent[0], signal.SIGTERM)  # the agent only: not the launcher, not the workers
    try:
        rc = launcher.wait(timeout=240)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    text = open(tmp_path / "out.txt").read()
    assert rc == 0, text[-3000:]
    assert "stopping cleanly at step" in text and "launch_resumable.sh: stopped cleanly" in text
    stopped_at = max(_losses(str(tmp_path / "run")))
    assert stopped_at < STEPS - 2 and _is_complete(cfg) == 1

    check(launch(cfg))  # the same command again (one process: the same world of one)
    check(launch(ref_cfg))
    assert _is_complete(cfg) == 0
    resumed, ref = _losses(str(tmp_path / "run")), _losses(str(tmp_path / "ref"))
    assert sorted(resumed) == sorted(ref) and max(ref) > stopped_at
    for step, losses in resumed.items():  # a replayed step repeats exactly; every step equals the reference
        assert set(losses) == set(ref[step]) and len(set(losses)) == 1, (step, losses, ref[step])
    final = "checkpoints/phase_end_pretrain"
    assert compare_checkpoints(str(tmp_path / "ref" / final), [str(tmp_path / "run" / final)]) == {
        str(tmp_path / "run" / final): []}


def test_exit_after_minutes_follows_the_slurm_time_limit(monkeypatch):
    from megatron_mmbert.slurm import exit_after_minutes_for_job, job_minutes_left
    from megatron_mmbert.training.config import load_config

    now = 1_700_000_000.0
    assert job_minutes_left({"SLURM_JOB_END_TIME": str(int(now) + 3600)}, now) == 60.0
    assert exit_after_minutes_for_job(10.0, {"SLURM_JOB_END_TIME": str(int(now) + 3600)}, now) == 50.0
    assert exit_after_minutes_for_job(10.0, {"SLURM_JOB_END_TIME": str(int(now) + 300)}, now) == 0.0
    assert exit_after_minutes_for_job(10.0, {}, now) is None
    assert exit_after_minutes_for_job(10.0, {"SLURM_JOB_END_TIME": "Unknown"}, now) is None

    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 2 * 3600))
    cfg = load_config("tiny-cpu", ["--checkpoint.job_end_margin_minutes", "15"])
    assert 104.0 < cfg.checkpoint.exit_after_minutes <= 105.0
    assert load_config("tiny-cpu", ["--checkpoint.exit_after_minutes", "30"]).checkpoint.exit_after_minutes == 30.0
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    assert load_config("tiny-cpu").checkpoint.exit_after_minutes is None


@pytest.mark.slow
def test_srun_tasks_stop_on_sigusr1_with_a_checkpoint(tmp_path):
    """What srun starts under examples/slurm/pretrain.sbatch: ``python -m megatron_mmbert.pretrain
    --slurm-task`` once per task, ranks from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (two gloo
    processes here); Slurm's ``--signal=USR1@180`` signals every task."""
    from megatron_mmbert.checkpoints.dist import read_config, read_latest, verify_checkpoint

    cfg = tiny_run_config(str(tmp_path / "run.yaml"), write_manifest(tmp_path / "data"), str(tmp_path / "run"),
                          **ONE_PHASE)
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(subprocess_env(), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_NTASKS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_mmbert.pretrain", "--slurm-task", "--config", cfg], env=env, cwd=ROOT,
            stdout=open(tmp_path / f"out{rank}.txt", "w"), stderr=subprocess.STDOUT, start_new_session=True))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):
            assert all(p.poll() is None for p in procs) and time.time() < deadline, \
                open(tmp_path / "out0.txt").read()[-3000:] + open(tmp_path / "out1.txt").read()[-3000:]
            time.sleep(0.1)
        for p in procs:
            os.kill(p.pid, signal.SIGUSR1)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out = open(tmp_path / "out0.txt").read()
    assert codes == [0, 0], out[-3000:]
    assert "2 process(es)" in out and "stopping cleanly at step" in out
    latest = read_latest(str(tmp_path / "run" / "checkpoints"))
    verify_checkpoint(latest)
    step = read_config(latest)["train_state"]["step"]
    assert step == max(_losses(str(tmp_path / "run"))) < STEPS - 2
    assert _is_complete(cfg) == 1  # what the sbatch script asks before it requeues


def test_slurm_task_variables():
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.slurm import torch_env_from_slurm

    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
           "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert torch_env_from_slurm(env) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    with pytest.raises(ConfigError, match="SLURM_PROCID not set; start it with srun"):
        torch_env_from_slurm({k: v for k, v in env.items() if k != "SLURM_PROCID"})
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        torch_env_from_slurm({k: v for k, v in env.items() if k != "MASTER_ADDR"})


def test_run_complete_is_one_definition():
    """The trainer's resume and ``--is-complete`` ask the same question of a checkpoint's record."""
    from megatron_mmbert.training.state import TrainState, phase_complete, run_complete

    names = ["pre", "mid", "decay"]
    st = TrainState(phase_index=2, consumed_samples=40)
    record = st.to_checkpoint("decay", {}, 1, 2, {}, phase_samples=40)
    assert phase_complete(record) and run_complete(record, names)
    assert not run_complete(record, names[:2] + ["other"])  # not this config's last phase
    short = TrainState(phase_index=2, consumed_samples=39).to_checkpoint("decay", {}, 1, 2, {}, phase_samples=40)
    assert not run_complete(short, names) and not phase_complete(short)
    # the trainer passes the stream's row count, which wins over the record's
    assert run_complete(short, names, phase_samples=39)
    mid = TrainState(phase_index=1, consumed_samples=10).to_checkpoint("mid", {}, 1, 2, {}, phase_samples=10)
    assert phase_complete(mid) and not run_complete(mid, names)
