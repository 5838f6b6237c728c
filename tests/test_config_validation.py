"""One home for each check (issue 32): every config section validates itself, ``from_dict`` and the
library entry points run those checks, each error names the full dotted field, and the command-line
layers add no check of their own."""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest

from megatron_mmbert.config_base import ConfigError, check, from_dict
from megatron_mmbert.training import config as rc
from megatron_mmbert.training.preflight import validate

from tests.helpers.launch import ROOT


def _set(cfg, path: str, value) -> None:
    """Set the field at dotted ``path`` (list items by index, mapping entries by key) in Python."""
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part] if isinstance(node, dict) else getattr(node, part)
    if isinstance(node, dict):
        node[last] = value
    else:
        setattr(node, last, value)


# (override path, bad value, the field the error must name): one rule of each run-config section
RUN_SECTIONS = [
    ("seed", -1, "seed"),
    ("model.local_attention", 15, "model.local_attention"),
    ("model.hidden_size", 66, "model.hidden_size"),
    ("parallel.tensor_parallel", 0, "parallel.tensor_parallel"),
    ("parallel.context_parallel", 2, "parallel.context_parallel"),
    ("phases.1.mask_rate", 1.5, "phases.1.mask_rate"),
    ("phases.0.languages", "top:0", "phases.0.languages"),
    ("phases.2.name", "../escaped", "phases.2.name"),
    ("phases.0.tokens", 10**21, "phases.0.tokens"),
    ("data.anneal_segments", 0, "data.anneal_segments"),
    ("data.seed", 2**32, "data.seed"),
    ("optimizer.adam_eps", 0.0, "optimizer.adam_eps"),
    ("optimizer.adam_beta2", float("nan"), "optimizer.adam_beta2"),
    ("schedule.phases.decay.final_lr_ratio", 2.0, "schedule.phases.decay.final_lr_ratio"),
    ("schedule.phases.pretrain.lr", float("inf"), "schedule.phases.pretrain.lr"),
    ("batch.micro_batch_size", 0, "batch.micro_batch_size"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last"),
    ("checkpoint.job_end_margin_minutes", -5.0, "checkpoint.job_end_margin_minutes"),
    ("logging.eval_mask_rate", 1.5, "logging.eval_mask_rate"),
    ("train.max_consecutive_skips", 0, "train.max_consecutive_skips"),
    ("profiling.steps", [0], "profiling.steps"),
]


def _yaml_value(value):
    if isinstance(value, float) and value != value:
        return ".nan"
    if value == float("inf"):
        return ".inf"
    return str(value).replace("'", "") if isinstance(value, list) else str(value)


@pytest.mark.parametrize("path, value, field", RUN_SECTIONS)
def test_run_config_section_rule_names_the_full_field_from_yaml_and_from_python(path, value, field):
    # read from YAML and overrides (the command line's way): refused as the section is built
    with pytest.raises(ConfigError) as e:
        rc.load_config("tiny-cpu", [f"--{path}", _yaml_value(value)])
    assert field in {x.field for x in e.value.errors or [e.value]}, str(e.value)
    # built (or changed) in Python and handed to the library's start-up check: the same rule
    cfg = rc.load_config("tiny-cpu")
    _set(cfg, path, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1, check_data=False)
    assert field in {x.field for x in e.value.errors or [e.value]}, str(e.value)


def test_init_section_rule_from_yaml_and_from_python():
    with pytest.raises(ConfigError) as e:
        rc.load_config("tiny-cpu", ["--init.checkpoint", "a", "--init.strided_from", "b"])
    assert e.value.field == "init.strided_from"
    cfg = rc.load_config("tiny-cpu")
    cfg.init = rc.InitSection(checkpoint="a", strided_from="b")
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1, check_data=False)
    assert e.value.field == "init.strided_from"


def test_every_section_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        rc.load_config("tiny-cpu", ["--optimizer.adam_eps", "0", "--checkpoint.keep_last", "0",
                                    "--phases.decay.mask_rate", "2", "--parallel.tensor_parallel", "0",
                                    "--model.local_attention", "15"])
    fields = {x.field for x in e.value.errors}
    assert fields == {"optimizer.adam_eps", "checkpoint.keep_last", "phases.2.mask_rate", "parallel.tensor_parallel",
                      "model.local_attention"}
    assert str(e.value).startswith("5 problems:")
    cfg = rc.load_config("tiny-cpu")  # config_base.check: the same for a config built in Python
    cfg.optimizer.adam_eps, cfg.phases[2].mask_rate = 0.0, 2.0
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert {x.field for x in e.value.errors} == {"optimizer.adam_eps", "phases.2.mask_rate"}


def test_a_message_naming_its_field_names_the_full_path():
    with pytest.raises(ConfigError) as e:
        rc.load_config("tiny-cpu", ["--schedule.phases.mid.lr", "-1"])
    assert str(e.value).startswith("schedule.phases.mid.lr must be a positive finite number")


def test_cross_section_rules_stay_in_preflight():
    # a valid section each, wrong together: loading accepts it, the start-up check refuses it
    cfg = rc.load_config("tiny-cpu", ["--schedule.total_tokens", "1000000"])
    with pytest.raises(ConfigError, match="phase budgets do not add up") as e:
        validate(cfg, 1, check_data=False)
    assert e.value.field == "schedule.total_tokens"
    cfg = rc.load_config("tiny-cpu", ["--parallel.tensor_parallel", "3"])  # 4 heads
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by parallel.tensor_parallel=3"):
        validate(cfg, 3, check_data=False)


def test_layout_check_validates_model_and_parallel_built_in_python():
    from megatron_mmbert.config import PRESETS, ParallelConfig, validate_layout

    with pytest.raises(ConfigError) as e:
        validate_layout(dataclasses.replace(PRESETS["tiny"], local_attention=15), ParallelConfig(tensor_parallel=0), 1)
    assert {x.field for x in e.value.errors} == {"model.local_attention", "parallel.tensor_parallel"}


# -- the tools' configs: from_dict (YAML, flags) and the library entry points ----------------------------

def test_evaluate_config_from_dict_and_library_entry(tmp_path):
    from megatron_mmbert.evaluation.config import EvaluateConfig
    from megatron_mmbert.evaluation.run import evaluate

    with pytest.raises(ConfigError) as e:
        from_dict(EvaluateConfig, {"manifest": "m", "out": "o", "load": "ck", "mask_rate": 1.5})
    assert e.value.field == "mask_rate"
    with pytest.raises(ConfigError) as e:  # before any file is read or written
        evaluate(EvaluateConfig(manifest="m", out=str(tmp_path / "o"), load="ck", mask_rate=1.5))
    assert e.value.field == "mask_rate" and not (tmp_path / "o").exists()


def test_preprocess_read_options_check_themselves():
    from megatron_mmbert.data.preprocess import PreprocessConfig

    with pytest.raises(ConfigError) as e:
        from_dict(PreprocessConfig, {"inputs": ["i"], "output": "o", "tokenizer": "t", "read": {"text_mode": "para"}})
    assert e.value.field == "read.text_mode" and str(e.value).startswith("read.text_mode must be 'blank' or 'line'")


def test_plot_config_from_dict():
    from megatron_mmbert.evaluation.config import PlotConfig

    with pytest.raises(ConfigError) as e:
        from_dict(PlotConfig, {"what": "compare", "path": "p", "max_languages": 0})
    assert e.value.field == "max_languages"


@pytest.mark.parametrize("recipe, spec, field", [
    ({"chunk_mb": 0}, {}, "chunk_mb"),
    ({"chunk_mb": float("nan")}, {}, "chunk_mb"),
    ({}, {"density": 1.5}, "spec.density"),
    ({}, {"lam": float("inf")}, "spec.lam"),
    ({}, {"method": "ema"}, "spec.ema_decay"),
    ({}, {"weights": [1.0]}, "spec.weights"),  # against the recipe's two models
    ({"base": None}, {}, "base"),  # ties needs the base
])
def test_merge_recipe_from_dict_and_library_entry(tmp_path, recipe, spec, field):
    from megatron_mmbert.merge.config import MergeRecipe, run_merge
    from megatron_mmbert.merge.ties import MergeSpec

    data = {"models": ["a", "b"], "out": str(tmp_path / "o"), "base": "c", **recipe, "spec": spec}
    with pytest.raises(ConfigError) as e:
        from_dict(MergeRecipe, data)
    assert e.value.field == field, str(e.value)
    built = MergeRecipe(**{**data, "spec": MergeSpec(**spec)})
    with pytest.raises(ConfigError) as e:  # nothing opened or written
        run_merge(built, log=None)
    assert e.value.field == field and not (tmp_path / "o").exists()


def test_merge_checkpoints_checks_a_spec_built_in_python(tmp_path):
    from megatron_mmbert.merge.stream import merge_checkpoints
    from megatron_mmbert.merge.ties import MergeSpec

    with pytest.raises(ConfigError) as e:
        merge_checkpoints("c", ["a", "b"], MergeSpec(density=0.0), str(tmp_path / "o"), log=None)
    assert e.value.field == "spec.density"
    with pytest.raises(ConfigError) as e:
        merge_checkpoints("c", ["a", "b"], MergeSpec(weights=[1.0]), str(tmp_path / "o"), log=None)
    assert e.value.field == "spec.weights" and str(e.value).startswith("spec.weights has 1 values for 2 models")
    with pytest.raises(ConfigError) as e:
        merge_checkpoints("c", ["a", "b"], MergeSpec(), str(tmp_path / "o"), chunk_bytes=0, log=None)
    assert e.value.field == "chunk_bytes"


def test_merge_spec_own_rules_and_rules_against_the_models():
    from megatron_mmbert.merge.ties import MergeSpec

    MergeSpec(weights=[1.0, 2.0]).validate()  # alone it is fine; it is wrong for three models
    with pytest.raises(ConfigError) as e:
        MergeSpec(weights=[1.0, 2.0]).check_models(3)
    assert e.value.field == "weights"
    with pytest.raises(ConfigError) as e:
        MergeSpec().check_models(0)
    assert e.value.field == "models"


def test_selection_from_the_tool_config_and_the_library_entry():
    from megatron_mmbert.cli.ties_merge import MergeConfig
    from megatron_mmbert.evaluation.select import SelectConfig, select_best

    with pytest.raises(ConfigError) as e:
        from_dict(MergeConfig, {"models": ["a"], "out": "o", "base": "c", "select": {"enabled": True}})
    assert e.value.field == "select.manifest"
    with pytest.raises(ConfigError) as e:
        select_best(["run"], SelectConfig(enabled=True, manifest="m", mask_rate=0.0), log=None)
    assert e.value.field == "select.mask_rate"


def test_convert_configs_from_dict_and_library_entry():
    from megatron_mmbert.convert.config import ExportHfConfig, VerifyConfig
    from megatron_mmbert.convert.verify import verify

    with pytest.raises(ConfigError) as e:
        from_dict(VerifyConfig, {"hf_dir": "h", "load": "l", "rows": 0, "tolerance": -1.0})
    assert e.value.field == "rows"
    with pytest.raises(ConfigError) as e:
        from_dict(VerifyConfig, {"hf_dir": "h", "load": "l", "tolerance": float("nan")})
    assert e.value.field == "tolerance"
    with pytest.raises(ConfigError) as e:  # before any checkpoint is read or process group made
        verify(VerifyConfig(hf_dir="h", load="l", pp=0))
    assert e.value.field == "pp"
    with pytest.raises(ConfigError) as e:
        from_dict(ExportHfConfig, {"load": "l", "out": "o", "push_to_hub": "org/name@main"})
    assert e.value.field == "push_to_hub"


# -- one error type ------------------------------------------------------------------------------

def test_config_and_input_refusals_are_config_errors():
    from megatron_mmbert.checkpoints.dcp_io import UntrustedCheckpointError
    from megatron_mmbert.checkpoints.layout import CheckpointError
    from megatron_mmbert.config_base import YAMLTooLarge
    from megatron_mmbert.data.languages import LanguageListError, load_language_list
    from megatron_mmbert.data.preprocess import PreprocessError
    from megatron_mmbert.data.sources import BadInputError, InputError
    from megatron_mmbert.data.tokenizer import TokenizerError, load_tokenizer
    from megatron_mmbert.fileio import OutputRefused
    from megatron_mmbert.hub import HubError

    for cls in (YAMLTooLarge, CheckpointError, UntrustedCheckpointError, HubError, TokenizerError,
                LanguageListError, OutputRefused, PreprocessError, InputError, BadInputError):
        assert issubclass(cls, ConfigError), cls
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(os.path.join(ROOT, "no-such-tokenizer.json"))
    with pytest.raises(ConfigError):
        load_language_list(os.path.join(ROOT, "no-such-language-list.txt"))


# -- the command-line layers add no check ------------------------------------------------------------

CLI_DIR = os.path.join(ROOT, "megatron_mmbert", "cli")
NOT_A_TOOL = {"options.py", "__init__.py"}
"""The flag machinery every tool shares (it refuses an unreadable ``--config`` file where it reads it)."""


def _own_checks(source: str):
    """``raise ConfigError(...)`` / ``raise SystemExit(...)`` made up in ``source``, and ``.validate(``
    calls: a check of the command line's own. Re-raising a library error with its flags
    (``ConfigError(spec.explain(err))``) is not a check."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", ""))
            explains = any(isinstance(a, ast.Call) and getattr(a.func, "attr", "") == "explain" for a in node.exc.args)
            if name in ("ConfigError", "SystemExit") and not explains:
                found.append(f"line {node.lineno}: raise {name}")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("validate", "check_models"):
            found.append(f"line {node.lineno}: .{node.func.attr}()")
    return found


@pytest.mark.parametrize("module", sorted(f for f in os.listdir(CLI_DIR) if f.endswith(".py") and f not in NOT_A_TOOL)
                         + ["../pretrain.py"])
def test_command_lines_add_no_check_of_their_own(module):
    with open(os.path.join(CLI_DIR, module), encoding="utf-8") as f:
        source = f.read()
    assert _own_checks(source) == [], (
        f"{module} checks options itself; put the rule in its config's validate() (or the library entry)")


def test_the_check_finder_finds_a_check():
    # the test above can fail: a command line with a check of its own is caught, a re-raise is not
    src = ("def main(cfg, spec):\n    if cfg.x < 0:\n        raise ConfigError('x', field='x')\n"
           "    cfg.spec.validate()\n    raise ConfigError(spec.explain(err))\n")
    assert _own_checks(src) == ["line 3: raise ConfigError", "line 4: .validate()"]
