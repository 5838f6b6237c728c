"""Exact resume: a run SIGKILLed during a checkpoint write inside the batch ramp, right after a phase
boundary and in the middle of a phase, relaunched each time with the same command, repeats every
per-step loss of an uninterrupted run and ends with bitwise the same weights. Relaunching a finished
run changes nothing.

Each test runs at two layouts:

* ``one_process``: one process, fp32, megatron-core's plain Adam (the shared session run,
  ``tiny_run`` in tests/conftest.py, is the uninterrupted reference: its NaN gradient at step 3,
  skipped, is replayed by the resumed run too);
* ``shipped``: what examples/configs/mmbert_base.yaml and mmbert_small.yaml train with -- amp_bf16,
  StableAdamW without gradient clipping, best-fit packing, special tokens maskable, a batch ramp
  (4 -> 8 rows over the first 1024 tokens: steps 1-4) and the distributed optimizer, here over two
  data-parallel ranks (torchrun, gloo), whose optimizer state (StableAdamW's moments and step count,
  fp32 main parameters) is resharded on load. Its killed run saves asynchronously
  (``checkpoint.async_save``; its reference synchronously): killed while a background write is in
  flight, then after saves were published (the one of the step before the kill is still in flight:
  the relaunch resumes from the save before it), it still repeats every loss and ends bitwise equal,
  and every checkpoint it wrote is file for file the reference's.

The killed run is one run directory launched four times (kill during the save of step 4, kill after
step ``after_boundary``, kill after step ``mid_phase``, then to the end); the module fixture records
what each launch left, the tests check it.
"""

import copy
import hashlib
import os
import signal

import pytest

from tests.helpers.launch import check, launch
from tests.helpers.training import checkpoint_file_differences, compare_checkpoints, tiny_run_config, train_records

pytestmark = pytest.mark.slow  # every test here launches pretrain_mmbert.py

SHIPPED = {  # as mmbert_base.yaml (and mmbert_small.yaml, which inherits it) trains
    "precision": "amp_bf16",
    "optimizer": {"name": "stable_adamw", "clip_grad": 0.0},
    "data": {"packing": "best_fit", "mask_special_tokens": True},
    "parallel": {"use_distributed_optimizer": True},
    "batch": {"rampup_tokens": 1024},  # 4 rows (256 tokens) for steps 1-4, then 8 rows
}
LAYOUTS = {
    # pretrain ends at step 7 (phase_end_pretrain); step 8 is mid's first; the last save before 13 is 12.
    "one_process": {"nproc": 0, "sections": None, "after_boundary": 8, "mid_phase": 13,
                    "resumes_from": "iter_0000012: step 12,", "ramp_steps": 2},
    # best_fit packing, ramp over 4 steps: pretrain ends at step 8; step 9 is mid's first, 12 its last.
    # The killed run saves asynchronously: step 14's save is still in flight at the kill after step 15
    # (published at a step boundary, after the kill's), so the relaunch resumes from mid's end.
    "shipped": {"nproc": 2, "sections": SHIPPED, "killed_sections": {"checkpoint": {"async_save": True}},
                "after_boundary": 9, "mid_phase": 15, "resumes_from": "phase_end_mid: step 12,", "ramp_steps": 4},
}
SAVE_KILLED_AT = 4  # inside the ramp of both layouts (the one_process ramp ends with step 2's rows)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request, tiny_run, tmp_path_factory):
    """The uninterrupted reference and the killed-and-relaunched run of one layout."""
    layout = LAYOUTS[request.param]
    nproc = layout["nproc"]
    out = {"layout": layout, "nproc": nproc}
    base = tmp_path_factory.mktemp(f"resume-{request.param}")
    if layout["sections"] is None:  # the shared session run is this layout's reference
        out["full"], out["full_cfg"], sections = tiny_run.run_dir, tiny_run.config, tiny_run.sections
    else:
        sections = layout["sections"]
        out["full"] = str(base / "full")
        out["full_cfg"] = tiny_run_config(str(base / "full.yaml"), tiny_run.manifest, out["full"], **sections)
        check(launch(out["full_cfg"], nproc=nproc))
    killed = out["killed"] = str(base / "killed")
    killed_sections = copy.deepcopy(sections)
    for key, value in layout.get("killed_sections", {}).items():
        killed_sections.setdefault(key, {}).update(value)
    cfg = tiny_run_config(str(base / "killed.yaml"), tiny_run.manifest, killed, **killed_sections)
    ckpts = os.path.join(killed, "checkpoints")
    out["save_killed"] = launch(cfg, "--debug.sigkill_during_save_at_step", str(SAVE_KILLED_AT), nproc=nproc)
    out["after_save_kill"] = {"latest": _read(os.path.join(ckpts, "latest")), "entries": sorted(os.listdir(ckpts))}
    out["boundary_killed"] = launch(cfg, "--debug.sigkill_at_step", str(layout["after_boundary"]), nproc=nproc)
    out["mid_killed"] = launch(cfg, "--debug.sigkill_at_step", str(layout["mid_phase"]), nproc=nproc)
    out["finished"] = launch(cfg, nproc=nproc)
    return out


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _assert_sigkilled(p, nproc):
    if nproc:  # torchrun reports the worker's signal and exits 1
        assert p.returncode != 0 and "exitcode  : -9" in p.stderr, (p.returncode, p.stderr[-2000:])
    else:
        assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])


def _records_by_step(run_dir):
    by = {}
    for r in train_records(run_dir):
        by.setdefault(r["step"], []).append(r)
    return by


def _snapshot(directory):
    """(path, size, mtime, sha256) of every file below ``directory`` but the locks of the run and
    checkpoint folders (which name their latest holder); the resolved config (rewritten, the same, by
    every launch) without mtime."""
    out = []
    for root, _, files in os.walk(directory):
        for f in sorted(files):
            path = os.path.join(root, f)
            rel = os.path.relpath(path, directory)
            if f == ".lock":
                continue
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            st = os.stat(path)
            out.append((rel, st.st_size, None if rel == "resolved_config.yaml" else st.st_mtime_ns, digest))
    return sorted(out)


def test_kill_during_checkpoint_write_inside_the_ramp(runs):
    _assert_sigkilled(runs["save_killed"], runs["nproc"])
    after = runs["after_save_kill"]
    assert after["latest"] == "iter_0000002"
    assert f"iter_{SAVE_KILLED_AT:07d}" not in after["entries"]
    assert any(".tmp-" in e for e in after["entries"])  # the interrupted write was still there
    p = runs["boundary_killed"]  # the next launch resumed from step 2 and removed the leftovers
    assert "resumed from" in p.stdout and "iter_0000002" in p.stdout and "removed leftovers" in p.stdout, \
        p.stdout[-3000:]
    # the ramp: the steps replayed from step 3 ran with the ramp's rows, as the uninterrupted run did
    full, resumed = _records_by_step(runs["full"]), _records_by_step(runs["killed"])
    ramp = runs["layout"]["ramp_steps"]
    assert [full[s][0]["global_batch_rows"] for s in (1, ramp, ramp + 1)] == [4, 4, 8]
    assert len(resumed[3]) == 2 and all(r["global_batch_rows"] == full[3][0]["global_batch_rows"] for r in resumed[3])


def test_sigkill_after_phase_boundary_and_mid_phase(runs):
    layout, nproc = runs["layout"], runs["nproc"]
    _assert_sigkilled(runs["boundary_killed"], nproc)
    p = runs["mid_killed"]
    _assert_sigkilled(p, nproc)
    assert "resumed from" in p.stdout and "phase_end_pretrain" in p.stdout and "optimizer restored" in p.stdout
    p = check(runs["finished"])
    assert layout["resumes_from"] in p.stdout, p.stdout[-3000:]  # the last save published before the kill
    full, resumed = _records_by_step(runs["full"]), _records_by_step(runs["killed"])
    assert all(len(v) == 1 for v in full.values()) and sorted(full) == list(range(1, len(full) + 1))
    assert sorted(resumed) == sorted(full)
    for step, records in resumed.items():  # replayed steps repeat exactly, and match the full run
        assert all(r["loss"] == full[step][0]["loss"] for r in records), (step, records, full[step])
        assert all(r["phase"] == full[step][0]["phase"] for r in records)
    assert full[layout["after_boundary"]][0]["phase"] == "mid" != full[layout["after_boundary"] - 1][0]["phase"]
    assert len(resumed[layout["after_boundary"]]) == 2 and len(resumed[layout["mid_phase"]]) == 2


def test_resumed_run_ends_bitwise_equal(runs):
    diff = compare_checkpoints(os.path.join(runs["full"], "checkpoints", "phase_end_decay"),
                               [os.path.join(runs["killed"], "checkpoints", "phase_end_decay")])
    assert list(diff.values()) == [[]], diff


def test_async_saves_write_the_files_of_synchronous_saves(runs):
    """The killed run's checkpoints (``shipped``: written in the background, across four launches)
    are file for file the uninterrupted run's (written synchronously), optimizer state included."""
    if not runs["layout"].get("killed_sections", {}).get("checkpoint", {}).get("async_save"):
        pytest.skip("this layout's killed run saves synchronously")
    full, killed = (os.path.join(runs[k], "checkpoints") for k in ("full", "killed"))
    out = open(os.path.join(runs["killed"], "metrics.jsonl")).read()
    assert '"kind": "checkpoint"' in out and '"async": true' in out
    names = sorted(n for n in set(os.listdir(full)) & set(os.listdir(killed)) if os.path.isdir(os.path.join(full, n)))
    assert {"iter_0000002", "phase_end_pretrain", "iter_0000014", "phase_end_decay"} <= set(names), names
    assert {n: checkpoint_file_differences(os.path.join(full, n), os.path.join(killed, n)) for n in names} == \
        {n: [] for n in names}


def test_relaunching_a_finished_run_changes_nothing(runs):
    """Not a checkpoint, a metrics line, a TensorBoard events file, nor the resolved config."""
    before = _snapshot(runs["full"])
    p = check(launch(runs["full_cfg"], nproc=runs["nproc"]))
    assert "run already complete" in p.stdout and "phase_end_decay" in p.stdout, p.stdout[-2000:]
    after = _snapshot(runs["full"])
    assert after == before, (sorted(set(after) - set(before)), sorted(set(before) - set(after)))


def test_retention_keeps_phase_ends(runs):
    entries = sorted(os.listdir(os.path.join(runs["full"], "checkpoints")))
    assert {"phase_end_pretrain", "phase_end_mid", "phase_end_decay", "latest"} <= set(entries)
    assert open(os.path.join(runs["full"], "checkpoints", "latest")).read().strip() == "phase_end_decay"
