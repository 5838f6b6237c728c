"""Exact resume: SIGKILL at arbitrary steps (one just after a phase boundary) and during a
checkpoint write; the resumed run repeats every per-step loss and ends with bitwise the same weights."""

import os
import signal

import pytest

from tests.data_fixtures import demo_corpus, demo_shards, demo_tokenizer  # noqa: F401
from tests.training_helpers import check, compare_checkpoints, launch, tiny_run_config, train_records


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("resume")
    manifest = os.path.join(demo_shards, "manifest.json")
    out = {}
    for name in ("full", "killed", "save_killed"):
        out[name] = str(base / name)
        tiny_run_config(str(base / f"{name}.yaml"), manifest, out[name])
    out["cfg"] = {n: str(base / f"{n}.yaml") for n in ("full", "killed", "save_killed")}
    out["full_proc"] = check(launch(out["cfg"]["full"]))
    return out


def _losses_by_step(run_dir):
    by = {}
    for r in train_records(run_dir):
        by.setdefault(r["step"], []).append(r["loss"])
    return by


def test_sigkill_after_phase_boundary_and_mid_phase(runs):
    full = _losses_by_step(runs["full"])
    assert sorted(full) == list(range(1, 16)) and all(len(v) == 1 for v in full.values())
    cfg, run = runs["cfg"]["killed"], runs["killed"]
    # pretrain ends at step 7 (phase_end_pretrain saved); step 8 is mid's first step.
    p = launch(cfg, "--debug.sigkill_at_step", "8")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    p = launch(cfg, "--debug.sigkill_at_step", "13")
    assert p.returncode == -signal.SIGKILL
    assert "resumed from" in p.stdout and "phase_end_pretrain" in p.stdout
    p = check(launch(cfg))
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
    cfg, run = runs["cfg"]["save_killed"], runs["save_killed"]
    p = launch(cfg, "--debug.sigkill_during_save_at_step", "4")
    assert p.returncode == -signal.SIGKILL
    ckpts = os.path.join(run, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "iter_0000002"
    assert not os.path.exists(os.path.join(ckpts, "iter_0000004"))
    assert any(".tmp-" in e for e in os.listdir(ckpts))  # the interrupted write is still there
    p = check(launch(cfg))
    assert "resumed from" in p.stdout and "iter_0000002" in p.stdout and "removed leftovers" in p.stdout
    full = _losses_by_step(runs["full"])
    for step, losses in _losses_by_step(run).items():
        assert all(v == full[step][0] for v in losses), step
    diff = compare_checkpoints(os.path.join(runs["full"], "checkpoints", "phase_end_decay"),
                               [os.path.join(ckpts, "phase_end_decay")])
    assert list(diff.values()) == [[]], diff


def test_retention_keeps_phase_ends(runs):
    entries = sorted(os.listdir(os.path.join(runs["full"], "checkpoints")))
    assert {"phase_end_pretrain", "phase_end_mid", "phase_end_decay", "latest"} <= set(entries)
    assert open(os.path.join(runs["full"], "checkpoints", "latest")).read().strip() == "phase_end_decay"
