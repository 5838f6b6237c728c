"""The cluster side against a real Slurm (a one-node Slurm from Debian's packages, started by the
``slurm`` fixture; tests/helpers/slurm.py), and two nodes on one machine under torchrun.

* ``examples/slurm/pretrain.sbatch`` runs the tiny job to the end on CPU (flags on the sbatch command
  line override its GPU resources); the job's end time comes from squeue (Slurm 22.05 does not export
  ``SLURM_JOB_END_TIME``). That uninterrupted run is the reference of the other runs here.
* One job interrupted five ways in turn, each a save, a requeue and a resume: SIGUSR1 to the tasks
  (``scancel --signal``), to the batch shell only (``scancel --batch``), to both (``--full``), Slurm's
  own time-limit signal (``--signal=USR1@180`` after the limit is lowered to under 3 minutes), and an
  outside ``scontrol requeue``. It ends bitwise equal to the reference. While a signal is on its way
  the trainers are held with SIGSTOP (and released once it is pending), so every stop lands on a known
  step however slow the machine: the signal paths themselves are Slurm's.
* ``examples/slurm/preprocess_array.sbatch``: the launcher on a 2-CPU node (no file edited), one array
  task cancelled, the dependent finalize naming the missing shard task and its rerun command; that
  command and the finalize it prints give shards and manifest byte-identical to one run.
* Two torchrun agents (``--nnodes 2``, c10d rendezvous on localhost, one process each): rank 0 alone
  builds the data index, the other waits for it; both write the checkpoint; the resumed run ends
  bitwise equal to the reference.
"""

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers.launch import free_port
from tests.helpers.slurm import OneNodeSlurm, install, why_no_slurm
from tests.helpers.training import (
    ROOT, _env, check, compare_checkpoints, tiny_run_config, train_records, write_manifest,
)

pytestmark = pytest.mark.slow

PRETRAIN = os.path.join(ROOT, "examples", "slurm", "pretrain.sbatch")
PREPROCESS = os.path.join(ROOT, "examples", "slurm", "preprocess_array.sbatch")
# The tiny run: one phase of 49 steps (batch warmup 4 -> 8 rows of 64 tokens), a log line every 2 steps
# (the first after a resume may cover one), saves only when stopped and at the end.
STEPS_TOKENS, STEPS = 64 * 8 * 48, 49
RUN = {
    "phases": [{"name": "pretrain", "tokens": STEPS_TOKENS, "seq_len": 64, "mask_rate": 0.3, "languages": "all",
                "temperature": 0.7}],
    "schedule": {"total_tokens": STEPS_TOKENS, "phases": {"pretrain": {"lr": 1.0e-3, "warmup_tokens": 128}}},
    "checkpoint": {"every_steps": 0, "keep_last": 2, "job_end_margin_minutes": 1},
    "logging": {"interval": 2, "eval_rows_per_language": 1},
}
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
FINAL = os.path.join("checkpoints", "phase_end_pretrain")


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm(request):
    """A started one-node Slurm (installed first when missing); skipped, saying why, where the machine
    does not allow it."""
    reason = why_no_slurm()
    if reason is None:
        try:
            install()
        except RuntimeError as e:
            reason = f"could not install Slurm: {e}"
    if reason:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\ntests/test_slurm.py: Slurm tests skipped: {reason}", yellow=True)
        pytest.skip(reason)
    base = tempfile.mkdtemp(prefix="mmbert-slurm-")  # not under pytest's 0700 folders: munged must reach it
    cluster = OneNodeSlurm(base).start()
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


def _config(folder, name="run") -> str:
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(os.path.dirname(folder), "data")
    manifest = os.path.join(data, "manifest.json")
    if not os.path.exists(manifest):
        write_manifest(data)
    return tiny_run_config(os.path.join(folder, "run.yaml"), manifest, os.path.join(folder, name), **RUN)


def _job_env(cluster, folder):
    env = cluster.env(PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _log(folder, job) -> str:
    path = os.path.join(str(folder), "logs", f"mmbert-{job}.out")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


@pytest.fixture(scope="session")
def reference(request, tmp_path_factory):
    """The uninterrupted tiny run, two ranks: a pretrain.sbatch job where Slurm runs here, else torchrun
    (the two-node test needs it either way). Returns (run_dir, job log or None)."""
    folder = tmp_path_factory.mktemp("slurm-runs") / "reference"
    cfg = _config(folder)
    run_dir = os.path.join(str(folder), "run")
    try:
        cluster = request.getfixturevalue("slurm")
    except pytest.skip.Exception:
        cluster = None
    if cluster is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "pretrain_mmbert.py"), "--config", cfg]
        check(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600))
        return run_dir, None
    os.makedirs(folder / "logs", exist_ok=True)
    job = cluster.sbatch(*CPU_JOB, PRETRAIN, cfg, cwd=str(folder), env=_job_env(cluster, folder))
    info = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 600)
    log = _log(folder, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    return run_dir, log


# -- the pretraining job --------------------------------------------------------------------------

def test_pretrain_job_runs_to_the_end(slurm, reference):
    run_dir, log = reference
    assert f"training complete: {STEPS} steps" in log, log[-3000:]
    assert "requeueing" not in log and os.path.isdir(os.path.join(run_dir, FINAL))
    # Slurm 22.05 has no SLURM_JOB_END_TIME: the script asked squeue, and the run stops itself a margin
    # (1 minute here) before the 10-minute limit.
    if "22.05" in slurm.version:
        assert "the job ends at" in log
    import yaml

    resolved = yaml.safe_load(open(os.path.join(run_dir, "resolved_config.yaml")))
    assert 6 <= resolved["checkpoint"]["exit_after_minutes"] <= 9.0  # 10 - 1, less the start-up


def _state(pid):
    """(state letter, parent pid) from /proc/PID/stat; None once gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _trainers(config):
    """pids of the job's trainer processes: srun's tasks, the children of slurmstepd (not srun, not
    the processes a trainer forks)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            parent = _state(pid)[1]
            parent_name = open(f"/proc/{parent}/comm").read().strip()
        except (OSError, TypeError):
            continue
        if b"--slurm-task" in argv and config.encode() in argv and parent_name == "slurmstepd":
            pids.append(int(pid))
    return pids


def _pending(pid, signum) -> bool:
    bit = 1 << (signum - 1)
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return True  # gone
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & bit for m in masks)


def _hold_until_pending(pids, signum, trigger, timeout=90):
    """SIGSTOP the trainers, ``trigger()`` the signal through Slurm, SIGCONT once it is pending in all
    (or Slurm continued them itself: a requeue sends SIGCONT, then SIGTERM)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        trigger()
        deadline = time.time() + timeout
        while not all(_pending(pid, signum) or (_state(pid) or ("T",))[0] != "T" for pid in pids):
            assert time.time() < deadline, f"signal {signum} never reached the trainers {pids}"
            time.sleep(0.2)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_pretrain_job_survives_every_way_of_being_stopped(slurm, reference, tmp_path):
    """One job, stopped five ways in turn; each stop saves, the job requeues and resumes; the end is
    bitwise the reference's."""
    folder = tmp_path / "interrupted"
    cfg = _config(folder)
    run_dir = os.path.join(str(folder), "run")
    os.makedirs(folder / "logs", exist_ok=True)
    job = slurm.sbatch(*CPU_JOB, PRETRAIN, cfg, cwd=str(folder), env=_job_env(slurm, folder))

    def lower_time_limit():  # under 3 minutes left: the script's --signal=USR1@180 fires
        run_s = _seconds(slurm.job(job)["RunTime"])
        slurm.run("scontrol", "update", f"JobId={job}", f"TimeLimit={math.ceil(run_s / 60) + 2}")

    stops = [
        ("scancel --signal=USR1", signal.SIGUSR1, lambda: slurm.run("scancel", "--signal=USR1", job)),
        ("scancel --batch --signal=USR1", signal.SIGUSR1,
         lambda: slurm.run("scancel", "--batch", "--signal=USR1", job)),
        ("scancel --full --signal=USR1", signal.SIGUSR1, lambda: slurm.run("scancel", "--full", "--signal=USR1", job)),
        ("time limit", signal.SIGUSR1, lower_time_limit),
        ("scontrol requeue", signal.SIGTERM, lambda: slurm.run("scontrol", "requeue", job)),
    ]
    resumed_at, saved = 0, []
    for restarts, (how, signum, trigger) in enumerate(stops):
        pids = _wait_training(slurm, job, cfg, run_dir, restarts, resumed_at, folder)
        _hold_until_pending(pids, signum, trigger)
        info = _wait_requeued(slurm, job, restarts + 1, folder, how)
        if how == "time limit":  # back to 10 minutes before the requeued job starts
            slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
        deadline = time.time() + 120  # an outside requeue counts before the trainers have stopped
        while True:
            log = _log(folder, job)
            stopped = [int(s) for s in re.findall(r"stopping cleanly at step (\d+)", log)]
            if len(stopped) == restarts + 1 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert len(stopped) == restarts + 1, f"{how}: no clean stop\n{log[-3000:]}"
        saved.append(stopped[-1])
        resumed_at = stopped[-1]
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600)
    log = _log(folder, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert "pretrain.sbatch: SIGUSR1 to the batch shell" in log  # --batch and --full reached the trap
    assert re.search(r"loss \d+\.\d+ \(steps? \d+(-\d+)?\) \|", log)  # a short window says which steps
    assert saved == sorted(set(saved)), saved  # every stop saved further on, every resume continued

    # Each resume starts from the step the stop saved; its first log line says which steps it averages.
    for step in saved:
        assert f"step {step}, phase 'pretrain'" in log, step
    records = train_records(run_dir)
    for step in saved:
        first = next(r for r in records if r["step"] > step)
        assert first["window_steps"] == first["step"] - step, (step, first)

    # Bitwise: the final weights, and the loss of every log line that averages the same steps.
    ref_dir, _ = reference
    assert compare_checkpoints(os.path.join(ref_dir, FINAL), [os.path.join(run_dir, FINAL)]) == \
        {os.path.join(run_dir, FINAL): []}
    ref = {r["step"]: r for r in train_records(ref_dir)}
    same = [r for r in records if r["window_steps"] == ref[r["step"]]["window_steps"]]
    assert len(same) >= 10
    for r in same:
        assert r["loss"] == ref[r["step"]]["loss"], (r["step"], r["loss"], ref[r["step"]]["loss"])


def _seconds(runtime: str) -> int:
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def _wait_training(cluster, job, cfg, run_dir, restarts, after_step, folder, timeout=300):
    """Until the job's ``restarts``-th run has logged a step past ``after_step``; its trainers' pids."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = cluster.job(job)
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"), \
            f"{info}\n{_log(folder, job)[-4000:]}"
        if info.get("JobState") == "RUNNING" and int(info.get("Restarts", 0)) == restarts:
            metrics = os.path.join(run_dir, "metrics.jsonl")
            if os.path.exists(metrics) and any(r["step"] > after_step for r in train_records(run_dir)):
                pids = _trainers(cfg)
                if len(pids) == 2:
                    return pids
        time.sleep(0.3)
    raise AssertionError(f"run {restarts} of job {job} did not train\n{_log(folder, job)[-4000:]}")


def _wait_requeued(cluster, job, restarts, folder, how, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = cluster.job(job)
        if int(info.get("Restarts", 0)) >= restarts:
            return info
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"), \
            f"{how}: {info}\n{_log(folder, job)[-4000:]}"
        time.sleep(0.3)
    raise AssertionError(f"{how}: job {job} was not requeued\n{_log(folder, job)[-4000:]}")


# -- preprocessing --------------------------------------------------------------------------------

def test_preprocess_array_with_a_cancelled_task(slurm, tmp_path, demo_corpus, demo_tokenizer):
    from tests.helpers.preprocess import CHUNK_MB, output_files as _files, reference_output as _reference

    out = str(tmp_path / "out")
    expected = _reference(demo_corpus, demo_tokenizer, out)
    env = slurm.env(PYTHON=sys.executable)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    opts = ["--chunk_bytes", str(int(float(CHUNK_MB) * 2**20))]
    # No CPU setting: the launcher lowers its default (32) to this node's CPUs.
    res = slurm.run("bash", PREPROCESS, "--shards=2", demo_corpus, out, demo_tokenizer, *opts, cwd=str(tmp_path),
                    env=env)
    m = re.search(r"submitted array job (\d+) \(2 shards, (\d+) CPUs each\) and finalize job (\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    array, cpus, final = m.groups()
    assert int(cpus) == min(32, os.cpu_count())
    slurm.run("scancel", f"{array}_1")  # the second task waits for the CPUs the first one holds
    info = slurm.wait_state(final, ("COMPLETED", "FAILED", "CANCELLED"), 300)
    log = open(tmp_path / "logs" / f"mmbert-preprocess-finalize-{final}.out").read()
    assert info["JobState"] == "FAILED", log
    assert "(shard 1 of 2)" in log and "num_shards=2, shard_index=1" in log, log
    task0 = open(tmp_path / "logs" / f"mmbert-preprocess-{array}_0.out").read()
    mine = re.search(r"units planned \((\d+) in shard 0 of 2\), (\d+) already done", task0)
    assert mine and mine.group(2) == "0", task0  # its own units only, none done before

    rerun = re.search(r"shard task 1 of 2: (sbatch .*)", log).group(1)
    again = re.search(r"finalize: (sbatch .*)", log).group(1)
    assert f"--cpus-per-task={cpus}" in rerun and rerun.endswith("--num_shards 2 --shard_index 1")
    job = slurm.run(*shlex.split(rerun.replace("sbatch ", "sbatch --parsable ", 1)), cwd=str(tmp_path),
                    env=env).stdout.strip()
    assert slurm.wait_state(job, ("COMPLETED", "FAILED"), 300)["JobState"] == "COMPLETED"
    job = slurm.run(*shlex.split(again.replace("sbatch ", "sbatch --parsable ", 1)), cwd=str(tmp_path),
                    env=env).stdout.strip()
    assert slurm.wait_state(job, ("COMPLETED", "FAILED"), 300)["JobState"] == "COMPLETED"

    got = _files(out)
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], rel


# -- two nodes on one machine ---------------------------------------------------------------------

def _two_agents(cfg, *overrides, timeout=300):
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on localhost."""
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"two-nodes-{port}",
               os.path.join(ROOT, "pretrain_mmbert.py"), "--config", cfg, *overrides]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def test_two_nodes_on_one_machine(reference, tmp_path):
    cfg = _config(tmp_path / "two-nodes")
    run_dir = os.path.join(str(tmp_path / "two-nodes"), "run")
    cache = os.path.join(str(tmp_path / "two-nodes"), "index-cache")
    # First launch: stop after one step (as a time limit would), saving.
    outs = _two_agents(cfg, "--checkpoint.exit_after_minutes", "0")
    text = "\n".join(outs)
    assert text.count("cache miss: building") == 1, text[-4000:]  # one rank builds, the other waits
    assert [d for d in os.listdir(cache) if d.startswith("mmbert-index-")] and \
        not [d for d in os.listdir(cache) if ".tmp-" in d]
    latest = os.path.join(run_dir, "checkpoints", open(os.path.join(run_dir, "checkpoints", "latest")).read().strip())
    shards = sorted(f for f in os.listdir(latest) if f.endswith(".distcp"))
    assert len(shards) == 2, os.listdir(latest)  # written by both nodes
    # Second launch: resume to the end (the cache is found, nobody builds).
    outs = _two_agents(cfg)
    text = "\n".join(outs)
    assert "cache miss" not in text and "resumed from" in text, text[-3000:]
    assert f"training complete: {STEPS} steps" in text, text[-3000:]
    ref_dir, _ = reference
    final = os.path.join(run_dir, FINAL)
    assert compare_checkpoints(os.path.join(ref_dir, FINAL), [final]) == {final: []}
