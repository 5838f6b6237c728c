"""Model, layout and phase configs (presets, validation errors) and the config_base machinery (YAML, overrides)."""

import dataclasses

import pytest

from megatron_mmbert.config import (
    PRESETS,
    ModelConfig,
    ParallelConfig,
    PhaseConfig,
    load_model_config,
    model_preset,
    validate_layout,
)
from megatron_mmbert.config_base import ConfigError, apply_overrides, field_docs, from_dict, to_dict


def test_published_parameter_counts():
    # the published configs (jhu-clsp/mmBERT-base, -small on the HF Hub): 307,786,240 (base) and 140,897,536 (small), tied decoder counted once.
    assert PRESETS["mmbert-base"].num_parameters() == 307_786_240
    assert PRESETS["mmbert-small"].num_parameters() == 140_897_536


def test_modernbert_base_keeps_local_theta_10k():
    m = PRESETS["modernbert-base"]
    assert (m.global_rope_theta, m.local_rope_theta, m.vocab_size) == (160000.0, 10000.0, 50368)


def test_every_field_has_a_docstring():
    for cls in (ModelConfig, ParallelConfig, PhaseConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_presets_validate_at_their_intended_layouts():
    validate_layout(PRESETS["mmbert-base"], ParallelConfig(tensor_parallel=4, pipeline_parallel=2), 64)
    validate_layout(PRESETS["tiny"], ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 4)


def test_load_model_config_from_preset_and_overrides():
    cfg = load_model_config({"preset": "tiny", "hidden_size": 128, "num_attention_heads": 8})
    assert cfg.hidden_size == 128 and cfg.num_layers == PRESETS["tiny"].num_layers
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        load_model_config({"preset": "huge"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model.hiden_size"):
        load_model_config({"preset": "tiny", "hiden_size": 3})
    with pytest.raises(ConfigError, match="model.num_layers: expected an integer"):
        load_model_config({"preset": "tiny", "num_layers": "four"})


def test_cli_overrides_nested_and_list_items():
    data = {"model": {"hidden_size": 64}, "phases": [{"name": "a", "tokens": 10}, {"name": "b", "tokens": 5}]}
    apply_overrides(data, ["--model.hidden_size", "128", "--phases.1.mask_rate=0.05", "--model.fp8", "hybrid"])
    assert data["model"] == {"hidden_size": 128, "fp8": "hybrid"}
    assert data["phases"][1]["mask_rate"] == 0.05
    apply_overrides(data, ["--phases.b.tokens", "7"])  # by name
    assert data["phases"][1]["tokens"] == 7
    with pytest.raises(ConfigError, match="is neither an index below 2 nor a name among"):
        apply_overrides(data, ["--phases.5.tokens", "1"])
    with pytest.raises(ConfigError, match="has no value"):
        apply_overrides(data, ["--model.hidden_size"])


def test_round_trip_through_dict():
    cfg = model_preset("mmbert-small")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


# -- each validation error, with the values and the fix named ---------------------------------------

TINY = PRESETS["tiny"]  # 4 layers, 4 heads, intermediate 96


@pytest.mark.parametrize(
    "model, parallel, world, message",
    [
        (TINY, ParallelConfig(tensor_parallel=3), 3, r"num_attention_heads=4 is not divisible by parallel.tensor_parallel=3"),
        (dataclasses.replace(TINY, num_attention_heads=8, intermediate_size=100), ParallelConfig(tensor_parallel=8), 8,
         r"intermediate_size=100 is not divisible by parallel.tensor_parallel=8"),
        (TINY, ParallelConfig(pipeline_parallel=3), 3, r"num_layers=4 is not divisible by parallel.pipeline_parallel=3"),
        (TINY, ParallelConfig(pipeline_parallel=2, virtual_pipeline=4), 2, r"pipeline_parallel=2 x parallel.virtual_pipeline=4 = 8 stages"),
        (TINY, ParallelConfig(virtual_pipeline=2), 1, r"virtual_pipeline=2 needs parallel.pipeline_parallel > 1"),
        (TINY, ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6, r"world size 6 is not divisible by .* = 4; launch a multiple of 4"),
        (TINY, ParallelConfig(sequence_parallel=True), 1, r"sequence_parallel=true needs parallel.tensor_parallel > 1"),
        (TINY, ParallelConfig(context_parallel=2), 2, r"parallel.context_parallel=2 is not supported"),
        (dataclasses.replace(TINY, hidden_size=66), ParallelConfig(), 1, r"hidden_size=66 is not divisible by model.num_attention_heads=4"),
        (dataclasses.replace(TINY, local_attention=15), ParallelConfig(), 1, r"local_attention=15 must be a positive even"),
        (dataclasses.replace(TINY, fp8="hybrid", attention_backend="sdpa"), ParallelConfig(), 1, r"fp8='hybrid' needs TransformerEngine layers"),
        (TINY, ParallelConfig(tensor_parallel=0), 1, r"parallel.tensor_parallel=0 must be >= 1"),
    ],
)
def test_layout_errors_name_values_and_fix(model, parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(model, parallel, world)


def test_vocab_padding_follows_tensor_parallel():
    m = dataclasses.replace(TINY, vocab_size=1000)
    assert m.padded_vocab_size(1) == 1024 and m.padded_vocab_size(2) == 1024 and m.padded_vocab_size(4) == 1024
    assert dataclasses.replace(TINY, vocab_size=1100).padded_vocab_size(2) == 1280
    assert PRESETS["mmbert-base"].padded_vocab_size(8) == 256000  # no padding rows for Gemma 2


@pytest.mark.parametrize(
    "phase, message",
    [
        (PhaseConfig(name="p", tokens=0), "tokens must be positive"),
        (PhaseConfig(name="p", tokens=10, mask_rate=1.5), "mask_rate must be in"),
        (PhaseConfig(name="p", tokens=10, temperature=1.5), "temperature must be in"),
        (PhaseConfig(name="p", tokens=10, languages="some"), "languages must be 'all', 'top:N'"),
        (PhaseConfig(name="p", tokens=10, fixed_shares={"eng": 0.7, "code": 0.4}), "fixed_shares must be"),
    ],
)
def test_phase_errors(phase, message):
    with pytest.raises(ConfigError, match=message):
        phase.validate()


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 parses 1e-3 as a string; configs and --overrides mean the number.
    from megatron_mmbert.config import PhaseConfig

    data = apply_overrides({"name": "p", "tokens": 10}, ["--mask_rate", "3e-1", "--temperature", ".5"])
    phase = from_dict(PhaseConfig, data)
    assert phase.mask_rate == 0.3 and phase.temperature == 0.5
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        from_dict(PhaseConfig, {"name": "p", "tokens": 10, "mask_rate": "fast"})
