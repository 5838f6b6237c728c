"""Temperature sampling, language sets, fixed shares and the epoch cap, and realised shares."""

import numpy as np
import pytest

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.index import build_blending_indices
from megatron_mmbert.data.schedule import (
    format_table,
    phase_num_samples,
    plan_phase,
    plan_schedule,
    temperature_weights,
)

TOKENS = {"a": 1000, "b": 100, "c": 10, "d": 1}
NAMES = sorted(TOKENS)
COUNTS = [TOKENS[n] for n in NAMES]


@pytest.mark.parametrize(
    "tau,expected",
    [  # worked example of exponential temperature sampling (Conneau et al. 2020, XLM-R; independently computed)
        (1.0, [0.9001, 0.0900, 0.0090, 0.0009]),
        (0.7, [0.8017, 0.1600, 0.0319, 0.0064]),
        (0.5, [0.6907, 0.2184, 0.0691, 0.0218]),
        (0.3, [0.5324, 0.2668, 0.1337, 0.0670]),
        (0.0, [0.25, 0.25, 0.25, 0.25]),
    ],
)
def test_temperature_weights_reference_table(tau, expected):
    plan = plan_phase(PhaseConfig(name="x", tokens=1000, seq_len=10, temperature=tau), NAMES, COUNTS)
    np.testing.assert_allclose(plan.segment_weights[0], expected, atol=1e-4)


@pytest.mark.parametrize("cap,expected", [(1.0, [489, 100, 10, 1]), (4.0, [278, 278, 40, 4])])
def test_epoch_cap_reproduces_unimax_example(cap, expected):
    # UniMax (Chung et al. 2023): uniform budget (tau = 0) with an N-epoch cap, budget 600.
    plan = plan_phase(
        PhaseConfig(name="x", tokens=600, seq_len=1, temperature=0.0, max_epochs_per_language=cap), NAMES, COUNTS
    )
    np.testing.assert_allclose(plan.segment_weights[0] * 600, expected, atol=0.5)


def test_cap_impossible_is_a_clear_error():
    with pytest.raises(ConfigError, match="max_epochs_per_language"):
        plan_phase(PhaseConfig(name="x", tokens=5000, seq_len=1, max_epochs_per_language=1.0), NAMES, COUNTS)


def test_language_sets_and_fixed_shares():
    top = plan_phase(PhaseConfig(name="x", tokens=100, seq_len=1, languages="top:2"), NAMES, COUNTS)
    assert top.active.tolist() == [True, True, False, False]
    lst = plan_phase(PhaseConfig(name="x", tokens=100, seq_len=1, languages=["c", "d"]), NAMES, COUNTS)
    assert lst.active.tolist() == [False, False, True, True]
    fixed = plan_phase(
        PhaseConfig(name="x", tokens=100, seq_len=1, temperature=0.5, languages=["b", "c", "d"],
                    fixed_shares={"a": 0.4}), NAMES, COUNTS)
    w = fixed.segment_weights[0]
    assert w[0] == pytest.approx(0.4)
    np.testing.assert_allclose(w[1:] / w[1:].sum(), np.array([100, 10, 1]) ** 0.5 / (np.array([100, 10, 1]) ** 0.5).sum())
    with pytest.raises(ConfigError, match="not in the manifest"):
        plan_phase(PhaseConfig(name="x", tokens=100, seq_len=1, languages=["zz"]), NAMES, COUNTS)
    with pytest.raises(ConfigError, match="not a manifest language"):
        plan_phase(PhaseConfig(name="x", tokens=100, seq_len=1, fixed_shares={"code": 0.1}), NAMES, COUNTS)
    with pytest.raises(ConfigError, match="unique"):
        plan_schedule([PhaseConfig(name="x", tokens=1), PhaseConfig(name="x", tokens=1)], TOKENS)


def test_num_samples_rounds_to_global_batches():
    assert phase_num_samples(PhaseConfig(name="x", tokens=1000, seq_len=64)) == 16
    assert phase_num_samples(PhaseConfig(name="x", tokens=1000, seq_len=64), 6) == 18
    assert phase_num_samples(PhaseConfig(name="x", tokens=1000, seq_len=64, global_batch_size=4), 6) == 16


def test_realised_shares_within_one_sample():
    rng = np.random.default_rng(0)
    L = 1833
    tokens = np.maximum(1, (rng.lognormal(14, 3, L))).astype(np.int64)
    names = [f"lang{i:04d}" for i in range(L)]
    for tau in (0.7, 0.3):
        plan = plan_phase(PhaseConfig(name="x", tokens=200_000 * 8, seq_len=8, temperature=tau), names, tokens)
        p = tokens.astype(np.float64) ** tau
        p /= p.sum()
        di, _, counts = build_blending_indices(plan.segment_weights, plan.segment_sizes)
        assert np.abs(counts[0] - p * plan.num_samples).max() <= 1.0
        # and at every prefix (checked on a subsample of prefixes for memory)
        running = np.zeros(L)
        for n, d in enumerate(di[:20000], 1):
            running[d] += 1
            if n % 997 == 0:
                assert np.abs(running - p * n).max() <= 1.0


def test_annealed_plan_and_table():
    names = [f"x{i:04d}" for i in range(300)]
    tokens = np.arange(1, 301) ** 3
    plan = plan_phase(
        PhaseConfig(name="decay", tokens=10_000, seq_len=4, temperature=0.5, temperature_end=0.3, languages="all"),
        names, tokens, anneal_segments=10)
    assert len(plan.segment_sizes) == 10 and plan.segment_sizes.sum() == plan.num_samples
    assert plan.segment_taus[0] == pytest.approx(0.49) and plan.segment_taus[-1] == pytest.approx(0.31)
    # flatter over time: the smallest language's weight grows
    assert plan.segment_weights[-1, 0] > plan.segment_weights[0, 0]
    text = format_table(plan, warn_epochs=0.05, head=5, tail=3)
    assert "more languages" in text and "summary" in text and "WARNING" in text
    assert len(text.splitlines()) < 20
