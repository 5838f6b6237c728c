"""A changed config on resume: the changed keys are one WARNING; resume-critical keys (the data
position a checkpoint records, the architecture, the optimizer) are a ConfigError naming them; keys
derived per job (``checkpoint.exit_after_minutes`` from the Slurm time limit) and places are ignored.
The comparison on the shipped tiny config, then one real resume (of a copy of the shared session
run's step-2 checkpoint) and one refused resume."""


import os
import shutil

import pytest
import yaml

from megatron_mmbert.training import config as rc
from megatron_mmbert.training.resume_check import compare, flatten
from tests.helpers.launch import launch
from tests.helpers.training import tiny_run_config


def _resolved(*overrides):
    """tiny-cpu's resolved config as ``{run_dir}/resolved_config.yaml`` holds it."""
    cfg = rc.load_config("tiny-cpu", list(overrides))
    return yaml.safe_load(yaml.safe_dump(rc.resolved_dict(cfg), sort_keys=False))


def _changes(overrides, phase="mid", phase_done=False):
    """{key: reason or None} between tiny-cpu and tiny-cpu with ``overrides``, checkpoint in ``phase``."""
    return {c.key: c.reason for c in compare(_resolved(), _resolved(*overrides), phase, phase_done)}


def test_flatten_keys_phases_by_name():
    flat = flatten(_resolved())
    assert flat["phases"] == ["pretrain", "mid", "decay"]
    assert flat["phases.decay.mask_rate"] == _resolved()["phases"][2]["mask_rate"]
    assert flat["optimizer.name"] == "stable_adamw" and "phases.mid.fixed_shares" not in flat  # {} vanishes


def test_harmless_changes_warn_only():
    got = _changes(["--schedule.phases.mid.lr", "1e-4", "--logging.interval", "3", "--batch.micro_batch_size", "2",
                    "--parallel.tensor_parallel", "2", "--phases.decay.tokens", "40960",
                    "--phases.decay.mask_rate", "0.2"])
    assert got == {"schedule.phases.mid.lr": None, "logging.interval": None, "batch.micro_batch_size": None,
                   "parallel.tensor_parallel": None, "phases.decay.tokens": None,
                   "phases.decay.mask_rate": None}


def test_distributed_optimizer_set_either_way_is_the_same():
    got = _changes(["--parallel.use_distributed_optimizer", "false", "--optimizer.use_distributed_optimizer", "true"])
    assert got == {"parallel.use_distributed_optimizer": None, "optimizer.use_distributed_optimizer": None}


def test_precision_of_the_same_optimizer_state_is_free():
    # fp32 and amp_bf16 both train fp32 parameters: the same optimizer state (a real resume loads it).
    stored, new = _resolved("--precision", "fp32"), _resolved("--precision", "amp_bf16")
    assert {c.key: c.reason for c in compare(stored, new, "mid", False)} == {"precision": None}


def test_derived_and_moved_keys_are_ignored():
    assert _changes(["--checkpoint.exit_after_minutes", "42", "--run_dir", "/elsewhere",
                     "--checkpoint.dir", "/elsewhere/ckpt", "--data.cache_dir", "/scratch/idx"]) == {}


@pytest.mark.parametrize("overrides, key", [
    (["--data.seed", "5"], "data.seed"),
    (["--seed", "5"], "seed"),
    (["--model.num_layers", "3"], "model.num_layers"),
    (["--optimizer.name", "adamw"], "optimizer.name"),
    (["--phases.pretrain.tokens", "40960"], "phases.pretrain.tokens"),  # finished: shifts mid's streams
    (["--phases.mid.languages", "[eng_Latn]"], "phases.mid.languages"),
    (["--phases.mid.mask_rate", "0.2"], "phases.mid.mask_rate"),  # mid-phase recipe switch
    (["--phases.mid.global_batch_size", "8"], "phases.mid.global_batch_size"),
    (["--batch.global_batch_size", "8"], "batch.global_batch_size"),  # pretrain takes its batch from it
    (["--parallel.use_distributed_optimizer", "false"], "parallel.use_distributed_optimizer"),  # state layout
    (["--precision", "bf16"], "precision"),  # fp32 parameters -> bf16 ones with fp32 main copies
    (["--data.packing", "best_fit"], "data.packing"),  # issue 27: the rows of every phase are cut by it
    (["--data.mask_special_tokens", "true"], "data.mask_special_tokens"),  # issue 27: mid-phase masking
])
def test_critical_changes(overrides, key):
    got = _changes(overrides)
    assert got.get(key), got


def test_what_is_critical_depends_on_the_checkpoint_phase():
    # At the end of mid, mid's mask rate no longer matters; its token budget still positions decay.
    assert _changes(["--phases.mid.mask_rate", "0.2"], phase_done=True) == {"phases.mid.mask_rate": None}
    assert _changes(["--phases.mid.tokens", "40960"], phase_done=True)["phases.mid.tokens"]
    # In pretrain, mid has not begun: its budget and the default batch (mid sets its own) are free.
    assert _changes(["--phases.mid.tokens", "40960"], phase="pretrain") == {"phases.mid.tokens": None}
    # The masking of special tokens may change at a phase end, not in the middle of one.
    assert _changes(["--data.mask_special_tokens", "true"], phase_done=True) == {"data.mask_special_tokens": None}


def test_reordering_begun_phases_is_critical():
    stored = _resolved()
    new = _resolved()
    new["phases"] = [new["phases"][1], new["phases"][0], new["phases"][2]]
    assert {c.key: bool(c.reason) for c in compare(stored, new, "mid", False)} == {"phases": True}
    dropped = _resolved()
    dropped["phases"] = dropped["phases"][:2]  # decay not begun: a warning
    got = {c.key: c.reason for c in compare(stored, dropped, "mid", False)}
    assert got["phases"] is None and all(r is None for r in got.values())


def test_resume_checks_the_manifest_against_the_recorded_data_position(tmp_path, capsys):
    """The data position a checkpoint records (training/data_position.py, from the run's real index
    plan) against the manifest on resume: unchanged, nothing; other token counts under the same path,
    a critical change; a malformed record, an error naming the checkpoint."""
    import json

    from megatron_mmbert.checkpoints.layout import CONFIG_FILE, DCP_METADATA
    from megatron_mmbert.cli.build_data_index import main as build_index
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.data.index import IndexPlan
    from megatron_mmbert.training.data_position import position_in_plan
    from megatron_mmbert.training.resume_check import resume_changes
    from tests.helpers.training import write_manifest

    manifest = write_manifest(tmp_path / "shards")
    cfg = rc.load_config(tiny_run_config(str(tmp_path / "run.yaml"), manifest, str(tmp_path / "run")))
    assert build_index(["--config", str(tmp_path / "run.yaml"), "--rows", "0"]) == 0
    folder = [l for l in capsys.readouterr().out.splitlines() if l.startswith("index ready in ")][0]
    plan = IndexPlan.read(folder.split("index ready in ", 1)[1].split(" (", 1)[0])
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / DCP_METADATA).write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_0000002\n")

    def record(position):
        state = {"step": 2, "phase": "pretrain", "seed": cfg.seed, "data_seed": cfg.data_seed,
                 "consumed_samples": 8, "data_position": position}
        (ckpt / CONFIG_FILE).write_text(json.dumps({"model": {}, "train_state": state}))

    record(position_in_plan(plan, 0, 8).to_dict())
    assert resume_changes(cfg) == ([], str(ckpt))
    write_manifest(tmp_path / "shards", languages=("fra_Latn", "deu_Latn"))  # same path, other content
    changes, _ = resume_changes(cfg)
    assert [c.key for c in changes] == ["data.manifest (content)"] and "other shards" in changes[0].reason
    record({**position_in_plan(plan, 0, 8).to_dict(), "stream_positions": [0]})
    with pytest.raises(ConfigError, match=f"{ckpt / CONFIG_FILE}: train_state.data_position field 'stream_positions'"):
        resume_changes(cfg)


@pytest.mark.slow  # two short launches
def test_resume_warns_on_changed_keys_and_refuses_critical_ones(tiny_run, tmp_path):
    # A run stopped after step 2: the shared session run's step-2 checkpoint and resolved config in
    # a run folder of its own (run_dir and data.cache_dir are places: not compared).
    run = tmp_path / "run"
    shutil.copytree(os.path.join(tiny_run.run_dir, "checkpoints", "iter_0000002"), run / "checkpoints" / "iter_0000002")
    (run / "checkpoints" / "latest").write_text("iter_0000002\n")
    shutil.copyfile(os.path.join(tiny_run.run_dir, "resolved_config.yaml"), run / "resolved_config.yaml")
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), tiny_run.manifest, str(run), **tiny_run.sections)

    # Harmless change + another derived time limit: a warning naming exactly the changed key.
    second = launch(cfg, "--checkpoint.exit_after_minutes", "0.0001", "--logging.interval", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    warning = [line for line in second.stdout.splitlines() if "WARNING megatron_mmbert.training: the config differs" in line]
    assert len(warning) == 1 and "in 1 key(s): logging.interval: 1 -> 2" in warning[0], second.stdout[-2000:]
    assert "resumed from" in second.stdout and "stopping cleanly at step 3" in second.stdout

    # A critical key: refused before anything is loaded, resolved_config.yaml left as the run's.
    stored = (run / "resolved_config.yaml").read_text()
    third = launch(cfg, "--data.seed", "99")
    assert third.returncode == 2, (third.returncode, third.stderr[-2000:])
    assert "config error: cannot resume" in third.stderr and "data.seed: None -> 99" in third.stderr
    assert "Restore the values" in third.stderr and "Traceback" not in third.stderr
    assert (run / "resolved_config.yaml").read_text() == stored
