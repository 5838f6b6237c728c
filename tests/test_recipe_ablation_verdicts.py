"""benchmarks/recipe_ablation.py decides only where a paired difference exceeds twice its spread."""

import math

from benchmarks.recipe_ablation import decide, mean_spread


def test_mean_and_sample_spread():
    m, sd = mean_spread([1.0, 2.0, 3.0])
    assert m == 2.0 and sd == 1.0
    assert math.isnan(mean_spread([1.0])[1])


def test_verdict_only_beyond_twice_the_spread():
    assert decide([-0.30, -0.32, -0.31], "A better", "B better").endswith(": A better")
    assert decide([0.30, 0.32, 0.31], "A better", "B better").endswith(": B better")
    # |mean| 0.1 with spread 0.1: not beyond twice the spread.
    assert decide([0.0, 0.1, 0.2], "A", "B").endswith("undecided at this scale")
    # Fewer than three seeds never decide, however clear.
    assert decide([-1.0, -1.0], "A", "B").endswith("undecided at this scale")
