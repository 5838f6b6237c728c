"""tools/build_data_index.py: a training run config gives the very index the run will look up."""

import os

import pytest
import yaml

from megatron_mmbert.cli.build_data_index import main
from megatron_mmbert.data.index import build_data_index
from megatron_mmbert.data.shards import load_manifest
from megatron_mmbert.training.config import load_config
from tests.helpers.training import tiny_run_config, write_manifest


def _ready_path(out: str) -> str:
    line = [l for l in out.splitlines() if l.startswith("index ready in ")][0]
    return line.split("index ready in ", 1)[1].split(" (", 1)[0]


def test_run_config_form_matches_what_training_uses(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "shards")
    cfg_path = tiny_run_config(str(tmp_path / "run.yaml"), manifest, str(tmp_path / "run"))
    assert main(["--config", cfg_path, "--data.seed", "11", "--rows", "2"]) == 0
    built = _ready_path(capsys.readouterr().out)

    run = load_config(cfg_path, ["--data.seed", "11"])  # what pretrain_mmbert.py would load
    index = build_data_index(load_manifest(run.manifest_path), run.phases, run.data_seed,
                             run.index_cache_dir, run.batch.global_batch_size, run.data.anneal_segments)
    assert os.path.samefile(index.path, built)

    # The phase-list form with the same values reaches the same cache entry.
    with open(cfg_path) as f:
        phases = yaml.safe_load(f)["phases"]
    (tmp_path / "phases.yaml").write_text(yaml.safe_dump(phases))
    assert main(["--config", str(tmp_path / "phases.yaml"), "--manifest", manifest, "--cache-dir",
                 run.index_cache_dir, "--seed", "11", "--global-batch-size", "8"]) == 0
    assert os.path.samefile(_ready_path(capsys.readouterr().out), built)


def test_phase_list_needs_manifest_cache_and_seed(tmp_path, capsys):
    (tmp_path / "phases.yaml").write_text(yaml.safe_dump([{"name": "p", "tokens": 1024}]))
    assert main(["--config", str(tmp_path / "phases.yaml")]) == 2
    err = capsys.readouterr().err  # the library names each field (BuildIndexConfig.validate), the CLI its flag
    assert "3 problems" in err and "a phase list needs manifest, cache_dir and seed" in err
    for field in ("manifest", "cache_dir", "seed"):
        assert f"{field} is not set" in err and f"[--{field}]" in err, err


def test_prebuild_index_checks_a_config_built_in_python(tmp_path):
    # the library entry refuses what the command line refuses, before any array is built
    from megatron_mmbert.config import PhaseConfig
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.data.index.prebuild import BuildIndexConfig, prebuild_index

    manifest = write_manifest(tmp_path / "shards")
    cache = tmp_path / "cache"
    phases = [PhaseConfig(name="p", tokens=1024, seq_len=64, languages="all")]
    cfg = BuildIndexConfig(phases=phases, manifest=manifest, cache_dir=str(cache), seed=1, start_phase="q")
    with pytest.raises(ConfigError) as e:
        prebuild_index(cfg)
    assert e.value.field == "start_phase" and "is not a phase; phases are ['p']" in str(e.value)
    cfg.start_phase = None
    with pytest.raises(ConfigError) as e:  # built for a run that packs best_fit: the run would not find it
        prebuild_index(cfg, run=BuildIndexConfig(phases=phases, packing="best_fit", bin_rows=[2]), run_name="run.yaml")
    assert {x.field for x in e.value.errors} == {"packing", "bin_rows"}
    assert "packing None differs from run.yaml's data.packing best_fit" in str(e.value)
    cfg.language_list = str(tmp_path / "absent.txt")
    with pytest.raises(ConfigError) as e:
        prebuild_index(cfg)
    assert e.value.field == "language_list"
    assert not cache.exists() or not os.listdir(cache)
