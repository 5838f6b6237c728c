"""Launching like the tools users know: ``mmbert-pretrain`` / ``python -m megatron_mmbert.pretrain``,
shipped configs by name (from a source checkout and from an installed package), ``--list-configs``,
a preset model as a section and phases addressed by name in overrides."""

import os
import subprocess
import sys

import pytest

from megatron_mmbert.config import PRESETS
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.training.config import config_path, load_config, resolved_dict, shipped_configs
from tests.helpers.launch import ROOT, subprocess_env

CONFIGS = os.path.join(ROOT, "examples", "configs")


def test_override_of_a_preset_field_on_a_shipped_config():
    """``model: mmbert-base`` (a string) takes ``--model.num_layers``; the other preset fields stay."""
    cfg = load_config("mmbert-base", ["--model.num_layers", "12", "--phases.decay.mask_rate", "0.04",
                                      "--phases.0.seq_len=512"])
    base = PRESETS["mmbert-base"]
    assert cfg.model.num_layers == 12 and base.num_layers == 22
    assert (cfg.model.hidden_size, cfg.model.vocab_size) == (base.hidden_size, base.vocab_size)
    assert cfg.phase("decay").mask_rate == 0.04 and cfg.phases[0].seq_len == 512
    # the inherited form: mmbert-small's file says `model: mmbert-small` over base's `model: mmbert-base`
    small = load_config("mmbert-small", ["--model.num_layers", "3"])
    assert small.model.num_layers == 3 and small.model.hidden_size == PRESETS["mmbert-small"].hidden_size
    with pytest.raises(ConfigError, match="'nodecay' is neither an index below 3 nor a name"):
        load_config("mmbert-base", ["--phases.nodecay.mask_rate", "0.1"])


def test_preset_section_and_inherit(tmp_path):
    """``model: {preset: ...}`` and the string form give the same model; a child file may change
    single fields of its parent's preset, and a child's preset name replaces the parent's model."""
    (tmp_path / "a.yaml").write_text(f"inherit: {os.path.join(CONFIGS, 'tiny_cpu.yaml')}\n"
                                     "model: {preset: mmbert-base}\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\nmodel: {num_layers: 6}\n")
    (tmp_path / "c.yaml").write_text("inherit: b.yaml\nmodel: mmbert-small\n")
    (tmp_path / "d.yaml").write_text("inherit: tiny-cpu\nseed: 5\n")  # a shipped name as the parent
    string_form = load_config("tiny-cpu", ["--model", "mmbert-base"]).model
    assert load_config(str(tmp_path / "a.yaml")).model == string_form == PRESETS["mmbert-base"]
    b = load_config(str(tmp_path / "b.yaml"), ["--model.hidden_size", "384", "--model.num_attention_heads", "6"])
    assert (b.model.num_layers, b.model.hidden_size, b.model.intermediate_size) == (
        6, 384, PRESETS["mmbert-base"].intermediate_size)
    assert load_config(str(tmp_path / "c.yaml")).model == PRESETS["mmbert-small"]
    d = load_config(str(tmp_path / "d.yaml"))
    assert d.seed == 5 and d.model.num_layers == load_config("tiny-cpu").model.num_layers


def test_config_by_name_is_the_shipped_file():
    names = shipped_configs()
    assert {"mmbert-base", "mmbert-small", "tiny-cpu", "decay-all"} <= set(names)
    assert config_path("tiny-cpu") == config_path("tiny_cpu") == config_path("tiny_cpu.yaml") \
        == os.path.join(CONFIGS, "tiny_cpu.yaml")
    assert resolved_dict(load_config("decay-cont")) == resolved_dict(load_config(os.path.join(CONFIGS, "decay_cont.yaml")))
    with pytest.raises(ConfigError, match="neither a file nor a shipped config; shipped: decay-all"):
        config_path("mmbert-huge")


def _pretrain(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "megatron_mmbert.pretrain", *args], capture_output=True,
                          text=True, cwd=cwd, env=env or subprocess_env(), timeout=120)


@pytest.mark.slow
def test_list_configs_and_validate_by_name(tmp_path):
    p = listing = _pretrain("--list-configs", cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(l.startswith("tiny-cpu ") and "quickstart" in l for l in lines)
    assert os.path.join(CONFIGS, "tiny_cpu.yaml") in p.stdout
    p = _pretrain("--config", "mmbert-base", "--validate", "--skip-data", "--world-size", "8",
                  "--model.num_layers", "12", cwd=str(tmp_path))
    assert p.returncode == 0 and "mmbert-base: valid" in p.stdout, p.stderr[-2000:]
    p = _pretrain("--config", "mmbert-huge", cwd=str(tmp_path))
    assert p.returncode == 2 and "mmbert-pretrain: config error: --config 'mmbert-huge'" in p.stderr
    # the old script is a shim over the same entry point
    shim = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_mmbert.py"), "--list-configs"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert shim.returncode == 0 and shim.stdout == listing.stdout


@pytest.mark.slow
def test_installed_package_carries_the_configs(tmp_path):
    """What ``pip install .`` installs (setup.py's build_py): the configs inside the package,
    resolved by name with their ``inherit:`` chain, outside any source checkout."""
    build = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    installed = build / "megatron_mmbert" / "configs"
    assert sorted(os.listdir(installed)) == sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml"))
    code = ("from megatron_mmbert.training.config import config_path, load_config\n"
            "print(config_path('mmbert-small-decay-all'))\n"
            "print(load_config('mmbert-small-decay-all', ['--model.num_layers', '4']).model.num_layers)\n")
    env = dict(subprocess_env(), PYTHONPATH=str(build))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(installed / "mmbert_small_decay_all.yaml"), "4"]
