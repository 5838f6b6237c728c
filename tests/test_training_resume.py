"""Exact resume: SIGKILL at arbitrary steps (one just after a phase boundary) and during a
checkpoint write; the resumed run repeats every per-step loss and ends with bitwise the same weights.
Relaunching a finished run changes nothing.

Each test runs twice: on one process in fp32 with megatron-core's plain optimizer, and as the shipped
mmBERT configs train, in bf16 with the distributed optimizer over two data-parallel ranks (torchrun,
gloo), whose optimizer state (Adam moments, fp32 main params and the Adam step count) is resharded on
load."""

import hashlib
import os
import signal

import pytest
from tests.helpers.training import check, compare_checkpoints, launch, tiny_run_config, train_records

LAYOUTS = {
    "one_process": {"nproc": 0, "sections": {}},
    # As mmbert_base.yaml / mmbert_small.yaml train: bf16 and the distributed optimizer, here over DP2.
    "bf16_distributed_optimizer_dp2": {
        "nproc": 2, "sections": {"precision": "bf16", "parallel": {"use_distributed_optimizer": True}}},
}
RUNS = ("full", "killed", "save_killed")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request, demo_shards, tmp_path_factory):
    layout = LAYOUTS[request.param]
    base = tmp_path_factory.mktemp(f"resume-{request.param}")
    manifest = os.path.join(demo_shards, "manifest.json")
    out = {"nproc": layout["nproc"], "cfg": {}}
    for name in RUNS:
        out[name] = str(base / name)
        out["cfg"][name] = tiny_run_config(str(base / f"{name}.yaml"), manifest, out[name], **layout["sections"])
    out["full_proc"] = check(launch(out["cfg"]["full"], nproc=out["nproc"]))
    return out


def _assert_sigkilled(p, nproc):
    if nproc:  # torchrun reports the worker's signal and exits 1
        assert p.returncode != 0 and "exitcode  : -9" in p.stderr, (p.returncode, p.stderr[-2000:])
    else:
        assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])


def _losses_by_step(run_dir):
    by = {}
    for r in train_records(run_dir):
        by.setdefault(r["step"], []).append(r["loss"])
    return by


def _snapshot(directory):
    """(path, size, mtime, sha256) of every file below ``directory``."""
    out = []
    for root, _, files in os.walk(directory):
        for f in sorted(files):
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            st = os.stat(path)
            out.append((os.path.relpath(path, directory), st.st_size, st.st_mtime_ns, digest))
    return sorted(out)


def test_sigkill_after_phase_boundary_and_mid_phase(runs):
    full = _losses_by_step(runs["full"])
    assert sorted(full) == list(range(1, 16)) and all(len(v) == 1 for v in full.values())
    cfg, run, nproc = runs["cfg"]["killed"], runs["killed"], runs["nproc"]
    # pretrain ends at step 7 (phase_end_pretrain saved); step 8 is mid's first step.
    _assert_sigkilled(launch(cfg, "--debug.sigkill_at_step", "8", nproc=nproc), nproc)
    p = launch(cfg, "--debug.sigkill_at_step", "13", nproc=nproc)
    _assert_sigkilled(p, nproc)
    assert "resumed from" in p.stdout and "phase_end_pretrain" in p.stdout and "optimizer restored" in p.stdout
    p = check(launch(cfg, nproc=nproc))
    assert "iter_0000012" in p.stdout  # the last periodic save before the kill at 13
    resumed = _losses_by_step(run)
    assert sorted(resumed) == sorted(full)
    for step, losses in resumed.items():  # replayed steps repeat exactly, and match the full run
        assert all(v == full[step][0] for v in losses), (step, losses, full[step])
    assert len(resumed[8]) == 2 and len(resumed[13]) == 2
    diff = compare_checkpoints(os.path.join(runs["full"], "checkpoints", "phase_end_decay"),
                               [os.path.join(run, "checkpoints", "phase_end_decay")])
    assert list(diff.values()) == [[]], diff


def test_kill_during_checkpoint_write(runs):
    cfg, run, nproc = runs["cfg"]["save_killed"], runs["save_killed"], runs["nproc"]
    _assert_sigkilled(launch(cfg, "--debug.sigkill_during_save_at_step", "4", nproc=nproc), nproc)
    ckpts = os.path.join(run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "iter_0000002"
    assert not os.path.exists(os.path.join(ckpts, "iter_0000004"))
    assert any(".tmp-" in e for e in os.listdir(ckpts))  # the interrupted write is still there
    p = check(launch(cfg, nproc=nproc))
    assert "resumed from" in p.stdout and "iter_0000002" in p.stdout and "removed leftovers" in p.stdout
    full = _losses_by_step(runs["full"])
    for step, losses in _losses_by_step(run).items():
        assert all(v == full[step][0] for v in losses), step
    diff = compare_checkpoints(os.path.join(runs["full"], "checkpoints", "phase_end_decay"),
                               [os.path.join(ckpts, "phase_end_decay")])
    assert list(diff.values()) == [[]], diff


def test_relaunching_a_finished_run_changes_nothing(runs):
    ckpts = os.path.join(runs["full"], "checkpoints")
    before = _snapshot(ckpts)
    metrics = open(os.path.join(runs["full"], "metrics.jsonl")).read()
    p = check(launch(runs["cfg"]["full"], nproc=runs["nproc"]))
    assert "run already complete" in p.stdout and "phase_end_decay" in p.stdout, p.stdout[-2000:]
    assert _snapshot(ckpts) == before
    assert open(os.path.join(runs["full"], "metrics.jsonl")).read() == metrics  # no step was taken


def test_retention_keeps_phase_ends(runs):
    entries = sorted(os.listdir(os.path.join(runs["full"], "checkpoints")))
    assert {"phase_end_pretrain", "phase_end_mid", "phase_end_decay", "latest"} <= set(entries)
    assert open(os.path.join(runs["full"], "checkpoints", "latest")).read().strip() == "phase_end_decay"
