"""tools/plot.py: schedule, loss and compare pictures are written next to their data and not blank."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.evaluation import metrics, plots
from tests.helpers.launch import ROOT
from tests.helpers.training import write_manifest

pytest.importorskip("matplotlib")


def _not_blank(path):
    import matplotlib.image as mpimg

    assert os.path.getsize(path) > 5000
    image = mpimg.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100 and float(image[..., :3].std()) > 0.01


def test_schedule_plot_refuses_a_file_that_is_not_an_index_plan(tmp_path):
    """The typed plan reader (data/index/plan.py) names the first field missing or wrong."""
    (tmp_path / "index_plan.json").write_text('{"phases": [], "language_tokens": {}}')
    with pytest.raises(ConfigError, match=r"index_plan.json: version is missing"):
        plots.plot_schedule(str(tmp_path))


@pytest.mark.slow
def test_schedule_plot_from_an_index_plan(tmp_path):
    from megatron_mmbert.data.index import build_data_index, write_index_plan
    from megatron_mmbert.data.shards import load_manifest

    manifest = load_manifest(write_manifest(tmp_path / "data"))
    phases = [PhaseConfig(name="pretrain", tokens=4096, seq_len=64, languages="top:2", temperature=0.7),
              PhaseConfig(name="decay", tokens=2048, seq_len=128, languages="all", temperature=0.3)]
    index = build_data_index(manifest, phases, seed=3, cache_dir=None, default_global_batch_size=4)
    write_index_plan(index.plan, str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot.py"), "schedule", str(tmp_path / "cache")],
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "cache" / "schedule.png") in proc.stdout
    _not_blank(tmp_path / "cache" / "schedule.png")


def test_loss_plot_from_metrics_jsonl(tmp_path):
    from megatron_mmbert.training.logging import RunLogger

    log = RunLogger(str(tmp_path / "run"), None, enabled=True)
    for step in range(1, 13):
        phase = "pretrain" if step <= 8 else "decay"
        log.log_step({"step": step, "total_steps": 12, "phase": phase, "phase_index": int(step > 8),
                      "consumed_tokens": 64 * step, "total_tokens": 768, "consumed_pct": 100 * step / 12,
                      "loss": 8.0 / step ** 0.3, "accuracy": 0.01 * step, "lr": 1e-3, "grad_norm": 1.0,
                      "tokens_per_s": 1e3, "tflops": 0.0, "mfu": None, "memory_gib": 0.1, "eta_s": 1.0})
        if step % 4 == 0:
            sums = {"eng_Latn": torch.tensor([7.0 / step ** 0.2 * 40, 40.0, 9.0], dtype=torch.float64),
                    "swh_Latn": torch.tensor([7.5 / step ** 0.2 * 40, 40.0, 4.0], dtype=torch.float64)}
            result = metrics.summarize(sums, {"eng_Latn": 1, "swh_Latn": 1}, 64, {"eng_Latn": 900, "swh_Latn": 10})
            log.log_eval(step, phase, {"manifest": "heldout/manifest.json", "held_out": True, "seq_len": 64,
                                       "mask_rate": 0.15, **result})
    log.close()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 13, "los')  # a killed writer's torn last line is skipped
    path = plots.plot_loss(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "loss.png")
    _not_blank(path)


def test_compare_plot_from_compare_json(tmp_path):
    from megatron_mmbert.fileio import atomic_write_json

    results = {}
    for k, name in enumerate(["mid", "decay_a", "merged"]):
        sums = {lang: torch.tensor([100.0 * (3 + k * (i - 1) * 0.1), 20.0, 5.0 + k], dtype=torch.float64)
                for i, lang in enumerate(["eng_Latn", "fra_Latn", "swh_Latn"])}
        results[name] = metrics.summarize(sums, {lang: 2 for lang in sums}, 64,
                                          {"eng_Latn": 900, "fra_Latn": 300, "swh_Latn": 10})
    table = metrics.compare(results)
    assert table["languages"]["eng_Latn"]["winner"] == "merged"
    assert table["languages"]["swh_Latn"]["winner"] == "mid"
    atomic_write_json(str(tmp_path / "cmp" / "compare.json"), table)
    _not_blank(plots.plot_compare(str(tmp_path / "cmp")))
    assert os.path.isfile(tmp_path / "cmp" / "compare.png")


def test_missing_matplotlib_and_bad_input_are_named(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        plots.plot_loss(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"megatron-mmbert\[plots\]"):
        plots.plot_loss(str(tmp_path))


def test_compare_plot_stays_readable_at_1833_languages(tmp_path):
    """The picture's size does not grow with the languages: differences to the baseline per resource
    group, the worst and best named; a baseline that is not a compared model is refused."""
    import random

    from matplotlib.image import imread

    from megatron_mmbert.fileio import atomic_write_json

    rng = random.Random(0)
    models = ["mid", "decay", "merged"]
    langs = [f"l{i:04d}_Latn" for i in range(1833)]
    table = {"models": models, "languages": {}, "summary": {}, "wins": {},
             "groups": {"high": langs[:611], "mid": langs[611:1222], "low": langs[1222:]}}
    for lang in langs:
        base = rng.uniform(3, 7)
        loss = {"mid": base, "decay": base + rng.gauss(-0.1, 0.2), "merged": base + rng.gauss(-0.2, 0.2)}
        table["languages"][lang] = {"loss": loss, "accuracy": {m: 0.3 for m in models},
                                    "winner": min(loss, key=loss.get)}
    table["languages"]["l1500_Latn"]["loss"]["merged"] = 99.0  # an outlier far above the rest
    atomic_write_json(str(tmp_path / "compare.json"), table)
    path = plots.plot_compare(str(tmp_path), baseline="mid")
    _not_blank(path)
    height, width = imread(path).shape[:2]
    assert width < 2000 and height < 800, (width, height)
    with pytest.raises(ConfigError, match="baseline 'nope' is not a compared model"):
        plots.plot_compare(str(tmp_path), baseline="nope")
