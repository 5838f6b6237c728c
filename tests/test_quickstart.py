"""The README's main job, end to end: examples/quickstart.sh on the embedded tiny default.

Demo corpus -> tokenizer -> shards -> index -> pretrain/mid/decay on 2 processes -> three decay
variants from the mid-training checkpoint -> TIES merge -> Hugging Face export -> held-out comparison
of mid / variants / merge -> three plots. The MLM loss must fall in every phase of every run (mean of
the first three logged windows against the last three), and every trained model must beat nothing-
learned (ln of the vocabulary) on the held-out documents.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT, free_port

RUNS = ("train", "decay_anchor_heavy", "decay_cont", "decay_all")


def _losses_by_phase(run_dir):
    by_phase = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "train":
                by_phase.setdefault(record["phase"], []).append(record["loss"])
    return by_phase


@pytest.mark.slow
def test_quickstart_trains_merges_and_exports(tmp_path):
    out = tmp_path / "quickstart"
    # The interpreter under test (its environment is installed), as every other test's subprocess.
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    phases = _losses_by_phase(out / "train")
    assert list(phases) == ["pretrain", "mid", "decay"]
    for run in RUNS:
        for phase, losses in _losses_by_phase(out / run).items():
            assert len(losses) >= 6, (run, phase, losses)
            first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
            assert last < first, f"{run}/{phase}: loss {first:.3f} -> {last:.3f} does not fall"

    # Every phase end is kept, the decay variants branched from mid-training, all was exported.
    checkpoints = os.listdir(out / "train" / "checkpoints")
    assert {"phase_end_pretrain", "phase_end_mid", "phase_end_decay"} <= set(checkpoints)
    assert glob.glob(str(out / "train" / "tensorboard" / "events.out.tfevents.*"))
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    assert len(report["models"]) == 3
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(out / "hf")
    assert type(model).__name__ == "ModernBertForMaskedLM"
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")  # it travelled: shards -> checkpoints -> merge -> export
    assert len(tokenizer) == model.config.vocab_size
    for role in ("mask", "pad", "bos", "eos"):
        assert getattr(tokenizer, f"{role}_token_id") == getattr(model.config, f"{role}_token_id"), role
    assert "Hugging Face export loads" in proc.stdout

    # Held-out documents exist, and the comparison of mid / variants / merge on them was printed.
    import math

    heldout = json.loads((out / "shards" / "heldout" / "manifest.json").read_text())
    assert len(heldout["languages"]) == 20
    assert all(e["documents"] >= 1 for e in heldout["languages"].values())
    compare = json.loads((out / "eval_heldout" / "compare.json").read_text())
    models = ["mid", "decay_anchor_heavy", "decay_cont", "decay_all", "merged"]
    assert compare["models"] == models
    assert set(compare["languages"]) == set(heldout["languages"])
    header = next(line for line in proc.stdout.splitlines() if line.startswith("language "))
    assert header.split() == ["language", *models, "winner"], header
    assert "languages won: " in proc.stdout
    for name in models:
        loss = compare["results"][name]["mean"]["macro_loss"]
        assert loss < math.log(model.config.vocab_size) - 1, (name, loss)

    # The three plots were drawn, named at the end, and are PNGs with content.
    plots = proc.stdout.split("Plots:", 1)[1].split()
    assert [os.path.basename(p) for p in plots] == ["schedule.png", "loss.png", "compare.png"], plots
    for p in plots:
        with open(p, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p

    # It trains as every real run does, with the distributed optimizer (its state crossed from
    # phase_end_mid into each decay variant); rerunning the quickstart finds every run complete
    # (the trainer's --is-complete: no run is relaunched), merges and exports nothing again, and
    # leaves every checkpoint, the merge and the export as they were. (A relaunched finished run
    # leaving everything as it was: tests/test_training_resume.py.)
    import yaml

    resolved = yaml.safe_load((out / "train" / "resolved_config.yaml").read_text())
    assert resolved["parallel"]["use_distributed_optimizer"] is True
    def written_files():
        folders = [out / run / "checkpoints" for run in RUNS] + [out / "merged", out / "hf"]
        return {p: os.stat(p).st_mtime_ns for folder in folders
                for p in glob.glob(str(folder / "**"), recursive=True) if os.path.isfile(p)}

    before = written_files()
    metrics = {run: (out / run / "metrics.jsonl").read_text() for run in RUNS}
    again = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), str(out)],
                           capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    for run in RUNS:
        assert f"run already complete: {out / run} (not relaunched)" in again.stdout, again.stdout[-3000:]
    assert again.stdout.count("run already complete") == len(RUNS), again.stdout[-3000:]
    assert "merge and export already done" in again.stdout
    assert "languages won: " in again.stdout and "Hugging Face export loads" in again.stdout
    assert written_files() == before
    assert {run: (out / run / "metrics.jsonl").read_text() for run in RUNS} == metrics  # no step taken
