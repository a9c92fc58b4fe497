"""The benchmarks' paired-ratio statistics (benchmarks/_common.py): the median's confidence interval and the
verdict against a goal that overhead_vllm.py and load.py print."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import against_goal, median_interval, paired_ratio  # noqa: E402


def test_median_interval_uses_the_binomial_order_statistics() -> None:
    # n = 15: P(Binomial(15, 1/2) <= 3) = 576 / 32768, doubled 0.035 <= 0.05; with k = 5 it would be 0.118
    assert median_interval(list(range(15, 0, -1))) == (4, 12)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # 2 / 32 > 0.05: no 95 % interval from 5 samples
    assert median_interval([6, 5, 4, 3, 2, 1]) == (1, 6)  # 2 / 64 <= 0.05: the extremes
    assert median_interval(list(range(15)), level=0.5) == (5, 9)


def test_median_interval_covers_the_median_at_its_level() -> None:
    rng = random.Random(7)
    trials = 3000
    hits = 0
    for _ in range(trials):
        lo_hi = median_interval([rng.gauss(1.0, 0.1) for _ in range(15)])
        assert lo_hi is not None
        hits += lo_hi[0] <= 1.0 <= lo_hi[1]
    assert 0.95 <= hits / trials <= 0.98  # the exact coverage for n = 15 is 0.965


def test_against_goal_says_within_noise_unless_the_interval_clears_the_goal() -> None:
    around = [0.93, 0.94, 0.95, 0.96, 0.97, 0.96, 0.95, 0.94, 0.98, 0.96]
    assert against_goal(around, 0.95).startswith("within noise of 0.95x")
    assert against_goal([r + 0.05 for r in around], 0.95).startswith("met")
    assert against_goal([r - 0.05 for r in around], 0.95).startswith("missed")
    assert against_goal(around[:5], 0.95).startswith("too few pairs (5)")
    assert against_goal([float("nan")] * 10, 0.95) == "too few pairs (0) to tell"  # no decode steps streamed


def test_paired_ratio_prints_range_and_interval() -> None:
    assert paired_ratio([1.0, 0.9, 1.1, 0.95, 1.05]) == "1.000x [0.900, 1.100]"
    assert paired_ratio([1.0, 0.9, 1.1, 0.95, 1.05, 1.02]) == "1.010x [0.900, 1.100], 95% CI 0.900-1.100"
    assert paired_ratio([1.0, float("nan"), 0.9, 1.1, 0.95, 1.05]) == "1.000x [0.900, 1.100]"  # NaN left out
    assert paired_ratio([float("nan")]) == "n/a"
