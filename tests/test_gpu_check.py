"""benchmarks/gpu_check.sh cannot rot: it is rehearsed on CPU in a copy of the lent machine's environment
(benchmarks/device_rehearsal.sh: megatron-core only from carried wheels via ``pip install --target``
and PYTHONPATH, no network), and its budget and file count fit one device call."""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT

STEPS = ("imports", "model", "train", "parity", "attention", "host-syncs")
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _step_limits():
    text = open(SCRIPT, encoding="utf-8").read()
    limits = dict(kv.split("=") for kv in re.search(r'^STEP_LIMITS="([^"]+)"', text, re.M).group(1).split())
    invoked = re.findall(r"^(?:if ! )?step ([\w-]+) ", text, re.M)
    return {k: int(v) for k, v in limits.items()}, invoked


def test_the_step_budget_fits_one_device_call():
    """Step limits add up to at most 480 s (a 10-minute call, a cold start, the extension build and
    the copy back beside them), and every step run has a limit and is run once."""
    limits, invoked = _step_limits()
    assert sum(limits.values()) <= 480, limits
    assert tuple(invoked) == STEPS and set(limits) == set(STEPS), (invoked, limits)
    text = open(SCRIPT, encoding="utf-8").read()
    assert 'BUDGET=${BUDGET:-540}' in text


def test_the_carried_wheels_are_what_the_lent_machine_lacks():
    sys.path.insert(0, ROOT)
    from benchmarks import device_env

    carried = device_env.carried_requirements()
    assert "megatron-core==0.16.1" in carried
    assert {device_env.requirement_name(r) for r in carried} == {"megatron-core", "zstandard"}
    lent = device_env.lent_packages()
    assert {"torch", "transformers", "pyyaml", "pytest", "triton"} <= lent
    hidden = device_env.hidden_distributions()
    assert {"megatron-core", "zstandard", "megatron-mmbert", "torch-optimi"} <= hidden and "torch" not in hidden
    assert device_env._wheel_matches("megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                                     "megatron-core==0.16.1", "3.12")
    assert not device_env._wheel_matches("megatron_core-0.16.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                         "megatron-core==0.16.1", "3.12")
    assert not device_env._wheel_matches("megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                                         "megatron-core==0.16.1", "3.12")


@pytest.mark.slow
def test_the_rehearsal_environment_hides_megatron_core(tmp_path):
    """The rehearsal's interpreter has torch (the same installed files) but no megatron-core, as the
    lent machine: its site-packages holds links to everything else, not a path onto all of it."""
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_env.py"), "environment", str(env_dir)],
                   check=True, capture_output=True, text=True)
    python = str(env_dir / "bin" / "python")
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = "import importlib.util as u; print(u.find_spec('torch') is not None, u.find_spec('megatron') is not None, " \
            "u.find_spec('zstandard') is not None, u.find_spec('megatron_mmbert') is not None)"
    out = subprocess.run([python, "-c", probe], env=clean, capture_output=True, text=True, check=True, cwd=str(tmp_path))
    assert out.stdout.split() == ["True", "False", "False", "False"], out


@pytest.mark.slow
def test_gpu_check_rehearsed_as_the_device_runs_it(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    before = open(results, encoding="utf-8").read()
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_rehearsal.sh")],
                          env=env, capture_output=True, text=True, timeout=1700)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:] + log[-6000:]
    assert "megatron-core is not importable" in proc.stdout
    assert "DRY RUN" in log
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8, files
    for step in STEPS:
        assert f"| {step} | ok |" in summary, summary
    assert re.search(r"megatron-core 0\.16\.1 from .*/site/megatron/core", log), log[:3000]
    sections = (out / "RESULTS.gpu.md").read_text()
    assert sections.count("## Model forward+backward throughput") == 2  # amp_bf16 and bf16
    assert "## Attention backends: one global + one local layer" in sections
    assert "## Training throughput" in sections and "## Host syncs on the step path" in sections
    assert "amp_bf16" in sections and "StableAdamW" in sections and "best_fit" in sections
    # the train step's asynchronous checkpoint: published, with the step's wait and the background write
    assert re.search(r"Asynchronous checkpoint .* the step waited \*\*[0-9.]+ s\*\*.* background write took \*\*[0-9.]+ s", sections), sections
    assert open(results, encoding="utf-8").read() == before  # results go to $OUT, not the repo
