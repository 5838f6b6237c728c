"""Named data sources (data/mixture.py): the shipped configs carry the released mixture, sources
join phases only through their shares, and a run whose manifest lacks one stops at start-up."""

import numpy as np
import pytest

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.mixture import RELEASED_MIXTURES, SOURCES
from megatron_mmbert.data.schedule import plan_phase
from megatron_mmbert.training import config as rc
from megatron_mmbert.training.preflight import validate_data
from tests.helpers.training import tiny_run_config, write_manifest


@pytest.mark.parametrize("config,phase,released", [
    ("mmbert_base", "pretrain", "pretrain"), ("mmbert_base", "mid", "mid"), ("mmbert_base", "decay", "decay_cont"),
    ("mmbert_small", "pretrain", "pretrain"), ("decay_cont", "decay", "decay_cont"),
    ("decay_eng", "decay", "decay_eng"), ("decay_all", "decay", "decay_all"),
    ("mmbert_small_decay_all", "decay", "decay_all"),
])
def test_shipped_configs_carry_the_released_mixture(config, phase, released):
    shares = rc.load_config(config).phase(phase).fixed_shares
    assert shares == RELEASED_MIXTURES[released].shares()
    assert all(name in SOURCES for name in shares)


def test_released_numbers():
    pre = RELEASED_MIXTURES["pretrain"]
    # The card's FineWeb2 1,196.6B is what the named sources leave of the released total (to 0.1%).
    rest = pre.total_tokens - sum(pre.source_billions.values()) * 1e9
    assert abs(rest - 1196.6e9) / pre.total_tokens < 1e-3
    assert sum(pre.shares().values()) == pytest.approx(0.398, abs=1e-3)
    assert RELEASED_MIXTURES["decay_cont"].shares()["megawika"] == 0.092


def test_sources_are_not_temperature_languages():
    names = ["arxiv", "dclm", "deu_Latn", "fra_Latn"]
    tokens = [10**9, 10**9, 10**6, 10**6]
    plan = plan_phase(PhaseConfig(name="p", tokens=10_000, seq_len=100, languages="all",
                                  fixed_shares={"dclm": 0.3}), names, tokens)
    w = plan.mean_weights
    assert w[0] == 0 and w[1] == pytest.approx(0.3) and np.allclose(w[2:], 0.35)
    top = plan_phase(PhaseConfig(name="p", tokens=10_000, seq_len=100, languages="top:1"), names, tokens)
    assert top.active.tolist() == [False, False, True, False]


def _run(tmp_path, langs, *overrides):
    manifest = write_manifest(tmp_path / "shards", langs)
    path = tiny_run_config(str(tmp_path / "run.yaml"), manifest, str(tmp_path / "run"))
    overrides = ["--phases.pretrain.fixed_shares", "{dclm: 0.3, starcoder: 0.05}", "--phases.pretrain.languages", "all",
                 "--phases.mid.languages", "all", *overrides]
    return rc.load_config(path, list(overrides))


def test_missing_source_stops_at_start_up_naming_it(tmp_path):
    cfg = _run(tmp_path, ("fra_Latn", "deu_Latn", "starcoder"))
    with pytest.raises(ConfigError) as e:
        validate_data(cfg)
    msg = str(e.value)
    assert "['dclm']" in msg and "mlfoundations/dclm-baseline-1.0" in msg and "data.without_sources" in msg
    assert "starcoder" not in msg.split("]", 1)[0]  # only the missing one is named


def test_without_sources_is_the_explicit_override(tmp_path):
    cfg = _run(tmp_path, ("fra_Latn", "deu_Latn", "starcoder"), "--data.without_sources", "[dclm]")
    assert cfg.phase("pretrain").fixed_shares == {"starcoder": 0.05}
    validate_data(cfg)  # starts
    # The resolved config (already without dclm) loads again.
    rc.write_resolved(cfg, str(tmp_path / "resolved.yaml"))
    again = rc.load_config(str(tmp_path / "resolved.yaml"))
    assert again.phase("pretrain").fixed_shares == {"starcoder": 0.05}
    with pytest.raises(ConfigError, match="data.without_sources names \\['dcml'\\]"):
        _run(tmp_path, ("fra_Latn", "starcoder"), "--data.without_sources", "[dcml]")


def test_manifest_with_the_sources_starts(tmp_path):
    validate_data(_run(tmp_path, ("fra_Latn", "deu_Latn", "dclm", "starcoder")))
