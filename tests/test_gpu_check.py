"""benchmarks/gpu_check.sh cannot rot: its --dry-run runs every step on CPU at tiny sizes."""

import os
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT

STEPS = ("machine", "parity", "attention", "model-base", "model-base-8192", "train", "model-small", "host-syncs")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    before = open(results, encoding="utf-8").read()
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=1500)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-4000:]
    assert "DRY RUN" in proc.stdout
    for step in STEPS:
        assert f"| {step} | ok |" in summary, summary
    sections = (tmp_path / "RESULTS.gpu.md").read_text()
    assert sections.count("## Model forward+backward throughput") == 3
    assert "## Attention backends: one global + one local layer" in sections
    assert "## Training throughput" in sections and "## Host syncs on the step path" in sections
    assert open(results, encoding="utf-8").read() == before  # results go to $OUT, not the repo
