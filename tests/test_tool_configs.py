"""One config system for every tool: --help-config, YAML input, flags over YAML, errors naming the field."""

import argparse
import dataclasses
import os
from typing import List, Literal, Optional

import pytest
import yaml

from megatron_mmbert.cli import build_data_index, convert_checkpoint, evaluate, plot, preprocess_data, ties_merge
from megatron_mmbert.cli.options import ConfigParser, parse_config
from megatron_mmbert.config_base import ConfigError, check, from_dict
from megatron_mmbert.data.preprocess import PreprocessConfig

from tests.helpers.launch import ROOT


@pytest.mark.parametrize("main, argv, expected", [
    (preprocess_data.main, [], ["PreprocessConfig:", "inputs: List[str]", "[--inputs]", "read:  (ReadOptions)",
                                "text_key: str = 'text'    [--read.text_key]", "[--framing.bos]", "[--chunk_bytes]"]),
    (ties_merge.main, [], ["MergeConfig:", "spec:  (MergeSpec)", "lam: float = 1.0    [--spec.lam]", "[--verify]"]),
    (convert_checkpoint.main, [], ["== import-hf ==", "== export-hf ==", "== verify ==",
                                   "precision: Literal['fp32', 'bf16', 'amp_bf16'] = 'fp32'    [--precision]"]),
    (convert_checkpoint.main, ["verify"], ["VerifyConfig:", "tolerance: Optional[float] = None    [--tolerance]"]),
    (build_data_index.main, [], ["BuildIndexConfig:", "phases[]:  (PhaseConfig)", "[--cache_dir]"]),
    (evaluate.main, [], ["EvaluateConfig:", "compare: List[str]", "[--verify]"]),
    (plot.main, [], ["PlotConfig:", "what: Literal['schedule', 'loss', 'compare'] = '<required>'    [--what]",
                     "max_languages: int = 60    [--max_languages]"]),
])
def test_help_config_lists_typed_fields_with_their_flags(main, argv, expected, capsys):
    assert main([*argv, "--help-config"]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text


def test_preprocess_yaml_equals_flags_and_flags_win(tmp_path):
    flags = ["--inputs", "a.jsonl", "b.txt", "--output", "out", "--tokenizer", "tok", "--read.lang", "eng_Latn",
             "--framing.bos", "false", "--chunk_bytes", str(2 << 20), "--workers", "3", "--log_interval_s", "1.5"]
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
    back_on, _ = parse_config(parser, spec, ["--config", str(path), "--framing.bos"])
    assert back_on.framing.bos is True  # a boolean flag can undo the YAML either way


def test_preprocess_bad_count_names_field_and_flag(capsys):
    assert preprocess_data.main(["--inputs", "a", "--output", "o", "--tokenizer", "t", "--chunk_bytes", "0"]) == 2
    assert "chunk_bytes must be positive, got 0 [--chunk_bytes]" in capsys.readouterr().err


def test_merge_recipe_example_is_valid_and_flags_override():
    recipe = os.path.join(ROOT, "examples", "merge", "merge_decay.yaml")
    parser, spec = ties_merge.build_parser()
    cfg, _ = parse_config(parser, spec, ["--config", recipe])
    assert cfg.spec.method == "ties" and cfg.spec.density == 0.2 and len(cfg.models) == 3 and cfg.base
    assert cfg.select.enabled and cfg.select.manifest and cfg.select.metric == "macro_loss"
    check(cfg)  # every section's validate(), the spec against its models too
    parser, spec = ties_merge.build_parser()
    cfg, _ = parse_config(parser, spec, ["--config", recipe, "--spec.density", "0.5", "--spec.lam", "0.8"])
    assert (cfg.spec.density, cfg.spec.lam, cfg.out) == (0.5, 0.8, "runs/mmbert_base_merged")


def test_merge_error_names_field_and_flag(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": ["a", "b"], "out": str(tmp_path / "o"), "base": "c",
                                      "spec": {"density": 1.5}}))
    assert ties_merge.main(["--config", str(recipe)]) == 2
    assert "density must be in (0, 1], got 1.5 [--spec.density]" in capsys.readouterr().err
    # the library names the field only; the flag is the command line's business
    from megatron_mmbert.merge.ties import MergeSpec

    with pytest.raises(ConfigError, match="weights has 1 values for 2 models") as info:
        MergeSpec(weights=[1.0]).check_models(2)
    assert info.value.field == "weights" and "--" not in str(info.value)


def test_convert_subcommand_yaml_equals_flags(tmp_path, capsys):
    parser, specs = convert_checkpoint._parser()
    flags = ["verify", "--hf_dir", "hf", "--load", "ck", "--tp", "2", "--precision", "bf16", "--verify", "false"]
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
    assert "VerifyConfig needs hf_dir" in err and "[--hf_dir]" in err


def test_build_index_mapping_yaml_equals_phase_list_and_flags(tmp_path):
    phases = [{"name": "p", "tokens": 1024}]
    (tmp_path / "list.yaml").write_text(yaml.safe_dump(phases))
    (tmp_path / "map.yaml").write_text(yaml.safe_dump({"phases": phases, "manifest": "m", "cache_dir": "c",
                                                       "seed": 3, "rows": 4}))
    ap, spec = build_data_index.build_parser()
    args, rest = ap.parse_known_args(["--config", str(tmp_path / "list.yaml"), "--manifest", "m", "--cache_dir", "c",
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
    assert from_yaml == plot.parse(["compare", "eval/decay", "--max_languages", "12"])
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
    cfg, _ = parse_config(parser, spec, ["--paths", "x", "y", "--limit", "2.5", "--inner.mode", "b", "--inner.on",
                                         "false", "--inner.limit", "3"])
    assert cfg == Tool(["x", "y"], 2.5, Inner("b", False, 3))
    with pytest.raises(SystemExit):
        parser.parse_args(["--inner.mode", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
    parse_config(parser, spec, ["--help-config"])
    out = capsys.readouterr().out
    assert "limit: Optional[float] = None    [--limit]" in out and "mode: Literal['a', 'b'] = 'a'    [--inner.mode]" in out


def _every_tool_spec():
    """(tool, ConfigParser) for every option-parsing command line the package ships."""
    out = []
    for name, module in (("preprocess", preprocess_data), ("ties_merge", ties_merge), ("evaluate", evaluate),
                         ("plot", plot), ("build_index", build_data_index)):
        _, spec = module.build_parser()
        out.append((name, spec))
    _, specs = convert_checkpoint._parser()
    out += [(f"convert {name}", spec) for name, spec in specs.items()]
    return out


def _yaml_keys(cls, prefix=""):
    """Every dotted YAML key of a config dataclass, generated from its fields."""
    import typing

    from megatron_mmbert.cli.options import _strip_optional

    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        keys += _yaml_keys(tp, prefix + f.name + ".") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return keys


def _sample(spec, path):
    """A value for the option at ``path`` and its command-line text (not the field's default)."""
    action = next(a for a in spec_parser_actions(spec) if a.dest == "cfg__" + path.replace(".", "__"))
    if action.nargs == "?":  # boolean
        return False, ["false"]
    if action.choices:
        value = list(action.choices)[-1]
    else:
        value = {int: 7, float: 0.25}.get(action.type, "x")
    return ([value], [str(value)]) if action.nargs == "+" else (value, [str(value)])


def spec_parser_actions(spec):
    return spec._parser._actions


@pytest.mark.parametrize("tool, spec", _every_tool_spec(), ids=[t for t, _ in _every_tool_spec()])
def test_every_flag_is_its_yaml_key(tool, spec):
    """One grammar: for every option of every tool, the flag generated from the config and the YAML key
    generated from the same config are the same string, and set the same value."""
    flags = {o.path: o.flag for o in spec.options if not o.deprecated}
    keys = [k for k in _yaml_keys(spec.cls) if k in flags]  # lists of sections (phases) are YAML only
    assert keys and set(keys) == set(flags)
    for key in keys:
        assert flags[key] == "--" + key, (tool, key, flags[key])
    parser = argparse.ArgumentParser(prog=tool)
    fresh = ConfigParser(spec.cls, spec.aliases)
    fresh.add_to(parser)
    fresh._parser = parser
    for key in keys:
        value, text = _sample(fresh, key)
        args = parser.parse_args([flags[key], *text])
        node = nested = {}
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        assert fresh.given(args) == nested, (tool, key)


def test_old_spellings_still_work_marked_deprecated(capsys):
    parser, spec = preprocess_data.build_parser()
    old, _ = parse_config(parser, spec, ["--input", "a", "--output", "o", "--tokenizer", "t", "--text-key", "body",
                                         "--no-bos", "--chunk-mb", "2", "--log-interval", "1.5"])
    parser, spec = preprocess_data.build_parser()
    new, _ = parse_config(parser, spec, ["--inputs", "a", "--output", "o", "--tokenizer", "t", "--read.text_key",
                                         "body", "--framing.bos", "false", "--chunk_bytes", str(2 << 20),
                                         "--log_interval_s", "1.5"])
    assert old == new
    err = capsys.readouterr().err
    assert "--chunk-mb is deprecated and goes in the next release; use --chunk_bytes" in err
    assert "--no-bos is deprecated" in err and "--text-key is deprecated" in err
    parser, spec = ties_merge.build_parser()
    help_text = parser.format_help()
    assert "[deprecated: --lambda]" in help_text and "[deprecated: --no-verify]" in help_text
    parser, spec = preprocess_data.build_parser()
    assert "deprecated: the same in MiB; use --chunk_bytes" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("main, argv, cls", [
    (preprocess_data.main, ["--inputs", "a", "--output", "o", "--tokenizer", "t", "--read.lang", "fra_Latn"],
     PreprocessConfig),
    (ties_merge.main, ["--config", os.path.join(ROOT, "examples", "merge", "merge_decay.yaml"), "--spec.lam", "0.5"],
     ties_merge.MergeConfig),
    (evaluate.main, ["--manifest", "m", "--load", "ck", "--out", "o"], evaluate.EvaluateConfig),
    (plot.main, ["compare", "cmp", "--max_languages", "9"], plot.PlotConfig),
])
def test_print_config_is_the_effective_config_and_reads_back(main, argv, cls, tmp_path, capsys):
    assert main([*argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    (tmp_path / "c.yaml").write_text(text)
    again = from_dict(cls, printed)
    if cls is not plot.PlotConfig:
        parser, spec = {PreprocessConfig: preprocess_data, ties_merge.MergeConfig: ties_merge,
                        evaluate.EvaluateConfig: evaluate}[cls].build_parser()
        direct, _ = parse_config(parser, spec, argv)
        assert again == direct
    assert main(["--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text


def test_convert_and_build_index_print_config(tmp_path, capsys):
    assert convert_checkpoint.main(["verify", "--hf_dir", "h", "--load", "l", "--precision", "bf16",
                                    "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["precision"] == "bf16"
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([{"name": "p", "tokens": 1024}]))
    assert build_data_index.main(["--config", str(tmp_path / "list.yaml"), "--manifest", "m", "--cache_dir", "c",
                                  "--seed", "5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["phases"][0]["tokens"] == 1024


@pytest.mark.parametrize("main, prog", [
    (preprocess_data.main, "mmbert-preprocess"), (ties_merge.main, "mmbert-ties-merge"),
    (evaluate.main, "mmbert-evaluate"), (plot.main, "mmbert-plot"), (build_data_index.main, "mmbert-build-index"),
    (convert_checkpoint.main, "mmbert-convert"),
])
def test_prog_is_the_console_script_and_version(main, prog, capsys):
    import megatron_mmbert

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} (megatron-mmbert) {megatron_mmbert.__version__}"
    setup_py = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert f'"{prog}=megatron_mmbert.cli.' in setup_py


def test_ties_merge_help_names_a_file_that_exists():
    import re

    parser, _ = ties_merge.build_parser()
    named = re.findall(r"examples/[\w./-]+\.yaml", parser.format_help() + (ties_merge.__doc__ or ""))
    assert named and all(os.path.exists(os.path.join(ROOT, p)) for p in named), named


@pytest.mark.slow
def test_a_closed_pipe_ends_help_config_quietly():
    import sys

    from tests.helpers.launch import run_process

    for cmd in ("tools/preprocess_data.py --help-config", "-m megatron_mmbert.pretrain --help-config"):
        # the reader is gone before the tool writes (what `| head` does to a long output)
        proc = run_process(["bash", "-c", f"set -o pipefail; {sys.executable} {cmd} | true"], cwd=ROOT, timeout=120)
        assert "Error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 141, (cmd, proc.returncode)


def test_pretrain_print_config_is_the_resolved_run_config(capsys):
    """After inherit:, phase edits and overrides: what the run would use, and what --config reads back."""
    from megatron_mmbert import pretrain
    from megatron_mmbert.training.config import from_mapping, load_config, resolved_dict

    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("megatron_mmbert").level
    try:  # main() sets up the run's log handlers; give pytest's back
        assert pretrain.main(["--config", "tiny-cpu", "--phases.mid.mask_rate", "0.2", "--print-config"]) == 0
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("megatron_mmbert").setLevel(saved[2])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert [p["mask_rate"] for p in printed["phases"] if p["name"] == "mid"] == [0.2]
    assert printed == resolved_dict(load_config("tiny-cpu", ["--phases.mid.mask_rate", "0.2"]))
    assert resolved_dict(from_mapping(printed)) == printed
