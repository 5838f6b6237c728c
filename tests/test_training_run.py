"""Multi-process runs: resharding a checkpoint TP2/PP1 -> TP1/PP2 and DP2,
the log line and TensorBoard fields, and non-finite gradients (skip and stop)."""

import glob
import json
import math
import os
import re
import shutil

import pytest
from tests.helpers.launch import check, launch
from tests.helpers.training import tiny_run_config, train_records

pytestmark = pytest.mark.slow  # every test here launches pretrain_mmbert.py

NO_DROPOUT = {"preset": "tiny", "num_layers": 2, "attention_output_dropout": 0.0}  # layout-independent loss


@pytest.fixture(scope="module")
def base(demo_shards, tmp_path_factory):
    return str(tmp_path_factory.mktemp("run")), os.path.join(demo_shards, "manifest.json")


def _resume_from(root, manifest, name, source, ckpt, sections, layout, nproc):
    """A new run dir holding only ``source``'s checkpoint ``ckpt``, resumed at ``layout`` for a step
    or two (exit_after_minutes 0: one step, save, clean exit -- the time-limit path)."""
    run = os.path.join(root, name)
    os.makedirs(os.path.join(run, "checkpoints"))
    shutil.copytree(os.path.join(source, "checkpoints", ckpt), os.path.join(run, "checkpoints", ckpt))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write(ckpt + "\n")
    c = tiny_run_config(os.path.join(root, f"{name}.yaml"), manifest, run, model=NO_DROPOUT, **sections)
    return run, check(launch(c, *layout, "--checkpoint.exit_after_minutes", "0", nproc=nproc))


@pytest.mark.parametrize("distributed_optimizer, packing", [(False, "concat"), (True, "best_fit")],
                         ids=["optimizer", "distributed_optimizer_best_fit"])
def test_resharding_tp2_to_pp2_dp2_and_one_process(base, distributed_optimizer, packing):
    """A TP2 checkpoint resumes at PP2, at DP2 and on one process; the DP2 run's own checkpoint
    resumes on one process. Every resumed step's loss equals the TP2 run's (within 1e-5). best_fit:
    the shipped packed rows (a micro-batch of 2 rows is one packed row, pieces crossing its rows).
    The two cases are the shipped mmBERT configs' choice (distributed optimizer, best_fit) and
    tiny_cpu's (plain optimizer, concat): each optimizer and each packing reshards once."""
    root, manifest = base
    root = os.path.join(root, ("distopt" if distributed_optimizer else "opt") + f"_{packing}")
    os.makedirs(root)
    sections = {"parallel": {"use_distributed_optimizer": distributed_optimizer}, "data": {"packing": packing}}
    ref = os.path.join(root, "tp2")
    cfg = tiny_run_config(os.path.join(root, "tp2.yaml"), manifest, ref, model=NO_DROPOUT, **sections)
    check(launch(cfg, "--parallel.tensor_parallel", "2", nproc=2))
    expected = {r["step"]: r["loss"] for r in train_records(ref)}
    resumed = {}
    for name, layout, nproc in (("pp2", ["--parallel.pipeline_parallel", "2"], 2), ("dp2", [], 2)):
        run, p = _resume_from(root, manifest, name, ref, "iter_0000010", sections, layout, nproc)
        # step 11 ends "mid" (phase-end save, no stop there), step 12 is decay's first: stop after it
        assert "stopping cleanly at step 12" in p.stdout and "optimizer restored" in p.stdout
        resumed[name] = train_records(run)
        assert [r["step"] for r in resumed[name]] == [11, 12]
    # DP2 -> one process: the DP2 run's own save at its stop (step 12) goes on at step 13.
    run, p = _resume_from(root, manifest, "dp1", os.path.join(root, "dp2"), "iter_0000012", sections, [], 0)
    assert "stopping cleanly at step 13" in p.stdout and "optimizer restored" in p.stdout
    resumed["dp1"] = train_records(run)
    assert [r["step"] for r in resumed["dp1"]] == [13]
    for name, recs in resumed.items():
        for rec in recs:
            assert abs(rec["loss"] - expected[rec["step"]]) < 1e-5, (name, rec, expected[rec["step"]])
    # the evaluation at mid's end (step 11) gives the same per-language numbers at PP2 and DP2
    # (where a language's single micro-batch leaves one data-parallel rank without rows)
    def mid_eval(run):
        (e,) = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"eval"' in l and '"step": 11' in l]
        return e["languages"]
    reference = mid_eval(ref)
    for name in ("pp2", "dp2"):
        other = mid_eval(os.path.join(root, name))
        assert set(other) == set(reference) and len(reference) == 10
        for lang, r in reference.items():
            assert other[lang]["masked_tokens"] == r["masked_tokens"], (name, lang)
            assert abs(other[lang]["loss"] - r["loss"]) < 1e-5, (name, lang, other[lang], r)


def test_log_line_tensorboard_and_nan_skip(tiny_run):
    """The shared session run (an evaluation every 5 steps, a NaN gradient at step 3 under
    nan_policy skip): its log lines, TensorBoard, evaluations and checkpoints."""
    root, manifest, run, p = tiny_run.root, tiny_run.manifest, tiny_run.run_dir, tiny_run.proc
    assert tiny_run.sections == {"logging": {"eval_interval": 5}, "train": {"nan_policy": "skip"},
                                 "debug": {"nan_grad_at_steps": [3]},
                                 "profiling": {"steps": [2], "memory_snapshot": True}}
    # profiling: a Chrome trace of step 2 (the optimizer's kernels in it); no GPU, so no snapshot
    trace = json.load(open(os.path.join(run, "profile", "step_2-rank0.json")))
    assert any("aten::" in e.get("name", "") for e in trace["traceEvents"])
    assert os.listdir(os.path.join(run, "profile")) == ["step_2-rank0.json"]
    assert "memory_snapshot: a CUDA allocator snapshot needs a GPU" in p.stdout
    assert "WARNING megatron_mmbert.training: non-finite gradient at step 3" in p.stdout and "update skipped" in p.stdout
    # logging configured at start-up: the attention backend and the layout, timestamped (rank 0, INFO)
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO megatron_mmbert\."
    backend_line = stamp + r"model\.build: model: 2 layers, hidden \d+, \w+ backend \(.*fp32"
    assert re.search(backend_line, p.stdout, re.M), p.stdout[:3000]
    assert re.search(stamp + r"runtime: initialised 1 process\(es\) .*TP=1 PP=1 CP=1 DP=1", p.stdout, re.M)
    line = [l for l in p.stdout.splitlines() if l.startswith("step 6/15 ")][0]
    for field in ("| pretrain |", "tok ", "%)", "loss ", "acc ", "lr ", "gnorm ", "tok/s", "TFLOP/s",
                  "MFU n/a", "mem ", "GiB", "eta "):
        assert field in line, (field, line)
    recs = train_records(run)
    assert all(math.isfinite(r["loss"]) for r in recs if r["step"] != 3)
    # every step records its wait for data (batches are built ahead in a thread); how short that wait is
    # is a speed figure, measured by benchmarks/train_throughput.py ("data" column), not timed here
    later = [r for r in recs if r["step"] > 2]
    assert later and all(r["time_data_s"] >= 0 and r["time_forward_backward_s"] > 0 for r in later), later
    assert "phase_end_decay" in open(os.path.join(run, "checkpoints", "latest")).read()
    # the tokenizer preprocessing kept beside the manifest travels into every checkpoint
    for ckpt in glob.glob(os.path.join(run, "checkpoints", "*_*")):
        saved = os.path.join(ckpt, "tokenizer", "tokenizer.json")
        assert open(saved, "rb").read() == open(os.path.join(os.path.dirname(manifest), "tokenizer",
                                                             "tokenizer.json"), "rb").read(), ckpt

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    from megatron_mmbert.training.logging import TB_FIELDS

    assert {f"train/{f}" for f in TB_FIELDS} <= tags, sorted(tags)
    assert {"eval/high/loss", "eval/mid/loss", "eval/low/loss", "eval/mean/loss", "eval/macro/accuracy"} <= tags
    assert len(acc.Scalars("train/loss")) == 15
    evals = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"eval"' in l]
    assert [e["step"] for e in evals] == [5, 7, 10, 11, 15]
    # each evaluation at its phase's row length and mask rate, per language of the phase (no
    # held-out data beside these shards: the training manifest, said so), plus resource terciles
    settings = {"pretrain": (64, 0.3, 6), "mid": (128, 0.15, 10), "decay": (128, 0.3, None)}
    for e in evals:
        seq_len, mask_rate, n_languages = settings[e["phase"]]
        assert (e["seq_len"], e["mask_rate"], e["held_out"]) == (seq_len, mask_rate, False), e
        assert len(e["languages"]) == (n_languages or len(e["languages"])) and len(e["languages"]) >= 6
        assert sorted(m for g in e["groups"].values() for m in g["members"]) == sorted(e["languages"])
        assert all(r["masked_tokens"] > 0 and math.isfinite(r["loss"]) for r in e["languages"].values())
        assert f"eval/lang/{next(iter(e['languages']))}/loss" in tags
    assert "eval at step 15 (decay; seq 128, mask 0.3" in p.stdout and "not held out" in p.stdout
    # epochs per language logged at each phase start, from the index plan
    starts = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"phase_data"' in l]
    plan = json.load(open(sorted(glob.glob(os.path.join(root, "index-cache", "*", "index_plan.json")))[0]))
    assert [s["phase"] for s in starts] == [p["name"] for p in plan["phases"]]
    for s, p in zip(starts, plan["phases"]):
        assert {lang for lang, r in p["languages"].items() if r["rows"]} == set(s["epochs"])
        assert all(e["cumulative"] == p["languages"][lang]["epochs"] for lang, e in s["epochs"].items())
    assert any(t.startswith("data/") for t in tags)


def test_nan_stop_names_the_step(base):
    root, manifest = base
    run = os.path.join(root, "nan_stop")
    cfg = tiny_run_config(os.path.join(root, "nan_stop.yaml"), manifest, run, debug={"nan_grad_at_steps": [3]})
    p = launch(cfg)
    assert p.returncode != 0
    assert "ERROR megatron_mmbert.training: non-finite gradient at step 3" in p.stdout and "was not applied" in p.stdout
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "iter_0000002"
