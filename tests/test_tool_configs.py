"""One config system for every tool: --help-config, YAML input, flags over YAML, errors naming the field."""

import argparse
import dataclasses
import os
from typing import List, Literal, Optional

import pytest
import yaml

from megatron_mmbert.cli import build_data_index, convert_checkpoint, evaluate, plot, preprocess_data, ties_merge
from megatron_mmbert.cli.options import ConfigParser, parse_config
from megatron_mmbert.config_base import ConfigError, from_dict
from megatron_mmbert.data.preprocess import PreprocessConfig

from tests.helpers.launch import ROOT


@pytest.mark.parametrize("main, argv, expected", [
    (preprocess_data.main, [], ["PreprocessConfig:", "inputs: List[str]", "[--input]", "read:  (ReadOptions)",
                                "text_key: str = 'text'    [--text-key]", "[--no-bos]", "[--chunk-mb]"]),
    (ties_merge.main, [], ["MergeConfig:", "spec:  (MergeSpec)", "lam: float = 1.0    [--lambda]", "[--no-verify]"]),
    (convert_checkpoint.main, [], ["== import-hf ==", "== export-hf ==", "== verify ==",
                                   "precision: Literal['fp32', 'bf16', 'amp_bf16'] = 'fp32'    [--precision]"]),
    (convert_checkpoint.main, ["verify"], ["VerifyConfig:", "tolerance: Optional[float] = None    [--tolerance]"]),
    (build_data_index.main, [], ["BuildIndexConfig:", "phases[]:  (PhaseConfig)", "[--cache-dir]"]),
    (evaluate.main, [], ["EvaluateConfig:", "compare: List[str]", "[--no-verify]"]),
    (plot.main, [], ["PlotConfig:", "what: Literal['schedule', 'loss', 'compare'] = '<required>'    [--what]",
                     "max_languages: int = 60    [--max-languages]"]),
])
def test_help_config_lists_typed_fields_with_their_flags(main, argv, expected, capsys):
    assert main([*argv, "--help-config"]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text


def test_preprocess_yaml_equals_flags_and_flags_win(tmp_path):
    flags = ["--input", "a.jsonl", "b.txt", "--output", "out", "--tokenizer", "tok", "--lang", "eng_Latn",
             "--no-bos", "--chunk-mb", "2", "--workers", "3", "--log-interval", "1.5"]
    parser, spec = preprocess_data.build_parser()
    from_flags, _ = parse_config(parser, spec, flags)
    assert from_flags.inputs == ["a.jsonl", "b.txt"] and from_flags.chunk_bytes == 2 << 20
    assert from_flags.framing.bos is False and from_flags.framing.eos is True and from_flags.read.lang == "eng_Latn"
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump({"inputs": ["a.jsonl", "b.txt"], "output": "out", "tokenizer": "tok",
                                    "read": {"lang": "eng_Latn"}, "framing": {"bos": False},
                                    "chunk_bytes": 2 << 20, "workers": 1, "log_interval_s": 1.5}))
    parser, spec = preprocess_data.build_parser()
    from_yaml, _ = parse_config(parser, spec, ["--config", str(path), "--workers", "3"])
    assert from_yaml == from_flags
    parser, spec = preprocess_data.build_parser()
    back_on, _ = parse_config(parser, spec, ["--config", str(path), "--bos"])
    assert back_on.framing.bos is True  # a boolean flag can undo the YAML either way


def test_preprocess_bad_count_names_field_and_flag(capsys):
    assert preprocess_data.main(["--input", "a", "--output", "o", "--tokenizer", "t", "--chunk-mb", "0"]) == 2
    assert "chunk_bytes must be positive, got 0 [--chunk-mb]" in capsys.readouterr().err


def test_merge_recipe_example_is_valid_and_flags_override():
    recipe = os.path.join(ROOT, "examples", "merge", "merge_decay.yaml")
    parser, spec = ties_merge.build_parser()
    cfg, _ = parse_config(parser, spec, ["--config", recipe])
    assert cfg.spec.method == "ties" and cfg.spec.density == 0.2 and len(cfg.models) == 3 and cfg.base
    assert cfg.select.enabled and cfg.select.manifest and cfg.select.metric == "macro_loss"
    cfg.spec.validate(len(cfg.models))
    parser, spec = ties_merge.build_parser()
    cfg, _ = parse_config(parser, spec, ["--config", recipe, "--density", "0.5", "--lambda", "0.8"])
    assert (cfg.spec.density, cfg.spec.lam, cfg.out) == (0.5, 0.8, "runs/mmbert_base_merged")


def test_merge_error_names_field_and_flag(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": ["a", "b"], "out": str(tmp_path / "o"), "base": "c",
                                      "spec": {"density": 1.5}}))
    assert ties_merge.main(["--config", str(recipe)]) == 2
    assert "density must be in (0, 1], got 1.5 [--density]" in capsys.readouterr().err
    # the library names the field only; the flag is the command line's business
    from megatron_mmbert.merge.ties import MergeSpec

    with pytest.raises(ConfigError, match="weights has 1 values for 2 models") as info:
        MergeSpec(weights=[1.0]).validate(2)
    assert info.value.field == "weights" and "--" not in str(info.value)


def test_convert_subcommand_yaml_equals_flags(tmp_path, capsys):
    parser, specs = convert_checkpoint._parser()
    flags = ["verify", "--hf-dir", "hf", "--load", "ck", "--tp", "2", "--precision", "bf16", "--no-verify"]
    args = parser.parse_args(flags)
    from_flags = specs["verify"].build(args)
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({"hf_dir": "hf", "load": "ck", "tp": 4, "precision": "bf16", "verify": False}))
    args = parser.parse_args(["verify", "--config", str(path), "--tp", "2"])
    from_yaml = specs["verify"].build(args, yaml.safe_load(path.read_text()))
    assert from_yaml == from_flags == convert_checkpoint.VerifyConfig("hf", "ck", tp=2, precision="bf16", verify=False)
    # a missing required field and a bad value are reported together, each with its flag
    path.write_text(yaml.safe_dump({"load": "ck", "rows": "many"}))
    assert convert_checkpoint.main(["verify", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "rows: expected an integer, got 'many' [--rows]" in err
    assert "VerifyConfig needs hf_dir" in err and "[--hf-dir]" in err


def test_build_index_mapping_yaml_equals_phase_list_and_flags(tmp_path):
    phases = [{"name": "p", "tokens": 1024}]
    (tmp_path / "list.yaml").write_text(yaml.safe_dump(phases))
    (tmp_path / "map.yaml").write_text(yaml.safe_dump({"phases": phases, "manifest": "m", "cache_dir": "c",
                                                       "seed": 3, "rows": 4}))
    ap, spec = build_data_index.build_parser()
    args, rest = ap.parse_known_args(["--config", str(tmp_path / "list.yaml"), "--manifest", "m", "--cache-dir", "c",
                                      "--seed", "5", "--rows", "4"])
    from_flags, _ = build_data_index.load_config(args, spec, rest)
    ap, spec = build_data_index.build_parser()
    args, rest = ap.parse_known_args(["--config", str(tmp_path / "map.yaml"), "--seed", "5"])
    from_yaml, _ = build_data_index.load_config(args, spec, rest)
    assert from_yaml == from_flags and from_yaml.seed == 5 and from_yaml.phases[0].tokens == 1024


def test_plot_yaml_equals_positionals_and_flags_win(tmp_path):
    recipe = tmp_path / "plot.yaml"
    recipe.write_text(yaml.safe_dump({"what": "compare", "path": "eval/decay", "max_languages": 12}))
    from_yaml = plot.parse(["--config", str(recipe)])
    assert from_yaml == plot.parse(["compare", "eval/decay", "--max-languages", "12"])
    assert from_yaml == plot.PlotConfig(what="compare", path="eval/decay", max_languages=12)
    assert plot.parse(["--config", str(recipe), "loss", "--out", "x.png"]).what == "loss"
    with pytest.raises(ConfigError, match=r"path.*\[--path\]"):
        plot.parse(["--what", "loss"])


def test_from_dict_reports_every_field_error_at_once():
    with pytest.raises(ConfigError) as info:
        from_dict(PreprocessConfig, {"inputs": "x", "workers": "two", "read": {"text_kee": "t"}})
    fields = {e.field for e in info.value.errors}
    assert {"inputs", "workers", "read.text_kee", "output", "tokenizer"} <= fields, fields
    assert str(info.value).startswith(f"{len(info.value.errors)} problems:")


@pytest.mark.parametrize("cls", [PreprocessConfig, ties_merge.MergeConfig, convert_checkpoint.ImportHfConfig,
                                 convert_checkpoint.ExportHfConfig, convert_checkpoint.VerifyConfig,
                                 build_data_index.BuildIndexConfig, evaluate.EvaluateConfig, plot.PlotConfig])
def test_every_tool_field_has_a_docstring(cls):
    from megatron_mmbert.config_base import _nested_sections, field_docs

    for sub in [cls] + [c for _, c in _nested_sections(cls, "")]:
        missing = [f.name for f in dataclasses.fields(sub) if f.init and f.name not in field_docs(sub)]
        assert not missing, f"{sub.__name__}: {missing}"


def test_a_new_field_is_a_new_flag_yaml_key_and_help_line(tmp_path, capsys):
    @dataclasses.dataclass
    class Inner:
        mode: Literal["a", "b"] = "a"
        """Which mode."""
        on: bool = True
        """Switch."""
        limit: int = 0
        """Same leaf name as Tool.limit: its flag spells the path."""

    @dataclasses.dataclass
    class Tool:
        paths: List[str]
        """Inputs."""
        limit: Optional[float] = None
        """A limit."""
        inner: Inner = dataclasses.field(default_factory=Inner)
        """A section."""

    parser = argparse.ArgumentParser()
    spec = ConfigParser(Tool)
    spec.add_to(parser)
    cfg, _ = parse_config(parser, spec, ["--paths", "x", "y", "--limit", "2.5", "--mode", "b", "--no-on",
                                         "--inner.limit", "3"])
    assert cfg == Tool(["x", "y"], 2.5, Inner("b", False, 3))
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
    parse_config(parser, spec, ["--help-config"])
    out = capsys.readouterr().out
    assert "limit: Optional[float] = None    [--limit]" in out and "mode: Literal['a', 'b'] = 'a'    [--mode]" in out
