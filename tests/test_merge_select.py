"""ties_merge --select.enabled: each input run's best kept checkpoint by held-out loss, reported."""

import dataclasses
import json
import os

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.cli.ties_merge import main as merge_main
from megatron_mmbert.config import PRESETS, ConfigError
from megatron_mmbert.convert.checkpoints import _single_process_model
from megatron_mmbert.evaluation.select import run_checkpoints
from tests.helpers.training import write_manifest

MODEL = dataclasses.replace(PRESETS["tiny"], num_layers=2)


def _write_run(root, chunk, clean, checkpoints):
    """A run folder whose checkpoints are ``clean`` weights plus noise of the given std (0: clean)."""
    for step, phase, noise in checkpoints:
        g = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p, c in zip(chunk.parameters(), clean):
                p.copy_(c + noise * torch.randn(c.shape, generator=g))
        ckpt.save_training(os.path.join(root, "checkpoints"), f"iter_{step:07d}", [chunk], None, MODEL,
                           {"step": step, "phase": phase, "consumed_samples": 0})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("select")
    torch.manual_seed(0)
    chunk = _single_process_model(MODEL)
    clean = [p.detach().clone() for p in chunk.parameters()]
    # Run A: the best decay checkpoint is the middle one (not the last); a mid-phase one is no candidate.
    _write_run(str(tmp / "a"), chunk, clean, [(1, "mid", 0.0), (2, "decay", 0.4), (4, "decay", 0.0), (6, "decay", 0.3)])
    # Run B: the best is the first.
    _write_run(str(tmp / "b"), chunk, clean, [(3, "decay", 0.0), (5, "decay", 0.5)])
    runtime.shutdown()
    heldout = write_manifest(tmp / "heldout")
    return tmp, heldout


def test_candidates_are_the_last_phase_kept_checkpoints(runs):
    tmp, _ = runs
    assert [(c["step"], c["phase"]) for c in run_checkpoints(str(tmp / "a"))] == [(2, "decay"), (4, "decay"), (6, "decay")]
    assert [c["step"] for c in run_checkpoints(str(tmp / "a" / "checkpoints"), "mid")] == [1]
    with pytest.raises(ConfigError, match="no checkpoint of phase 'pretrain'"):
        run_checkpoints(str(tmp / "a"), "pretrain")


def test_merge_of_the_best_checkpoint_of_each_run(runs, capsys):
    tmp, heldout = runs
    out = tmp / "merged"
    rc = merge_main(["--method", "linear", "--models", str(tmp / "a"), str(tmp / "b"), "--out", str(out),
                     "--select.enabled", "--select.manifest", heldout, "--select.tokens_per_language", "1024",
                     "--select.seq_len", "128", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    report = json.load(open(out / "merge_report.json"))
    sel = report["selection"]["runs"]
    assert [os.path.basename(s["chosen"]) for s in sel] == ["iter_0000004", "iter_0000003"]
    assert report["models"] == [s["chosen"] for s in sel]  # what was merged
    for s in sel:
        losses = {os.path.basename(c["checkpoint"]): c["macro_loss"] for c in s["candidates"]}
        assert min(losses, key=losses.get) == os.path.basename(s["chosen"])
        assert "lowest held-out macro_loss" in s["why"]
    assert len(sel[0]["candidates"]) == 3 and report["selection"]["config"]["manifest"] == heldout
    # Without a held-out manifest the selection is refused, naming the flag.
    assert merge_main(["--method", "linear", "--models", str(tmp / "a"), str(tmp / "b"), "--out",
                       str(tmp / "m2"), "--select.enabled", "--quiet"]) == 2
    assert "--select.manifest" in capsys.readouterr().err
