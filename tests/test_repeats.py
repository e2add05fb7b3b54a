"""Issue 14: the stopping rule of timed phases and the eval-token rule, on synthetic streams."""

from __future__ import annotations

import itertools

import pytest

from harness.measure.quality import EVAL_TOKENS_FLOOR, scaled_eval_tokens
from harness.stats import MIN_SAMPLES, RepeatPolicy, median_ci_rel, repeat_until
from harness.workload import CHUNK_TOKENS


def stream(values: list[float], seconds: float) -> object:
    """A sample function that yields `values` in a cycle, each taking `seconds`."""
    source = itertools.cycle(values)
    return lambda: (next(source), seconds)


def test_stops_at_the_ci_target_once_the_median_is_stable() -> None:
    noisy_then_stable = iter([1.0, 1.6, 0.7] + [1.0] * 100)
    outcome = repeat_until(lambda: (next(noisy_then_stable), 0.01), RepeatPolicy(target_ci_rel=0.05, budget_s=100))
    assert outcome.reason == "ci" and not outcome.budget_limited
    assert outcome.ci_rel is not None and outcome.ci_rel < 0.05
    assert 3 < len(outcome.values) < 100  # needed more than the minimum, far less than the budget allows


def test_stops_at_the_budget_and_says_so() -> None:
    outcome = repeat_until(stream([1.0, 2.0, 3.0, 0.5], 0.4), RepeatPolicy(target_ci_rel=0.01, budget_s=2.0))
    assert outcome.reason == "budget" and outcome.budget_limited
    assert len(outcome.values) == 5 and outcome.spent_s >= 2.0  # 5 x 0.4 s reaches the 2 s budget
    assert outcome.ci_rel is not None and outcome.ci_rel >= 0.01


@pytest.mark.parametrize("seconds", [0.0, 1000.0])
def test_never_fewer_than_three_samples(seconds: float) -> None:
    """Identical samples (CI 0 at once) and a single sample past the budget both still take 3."""
    outcome = repeat_until(stream([1.0], seconds), RepeatPolicy(budget_s=1.0))
    assert len(outcome.values) == MIN_SAMPLES
    with pytest.raises(ValueError):
        RepeatPolicy(min_samples=2)


def test_min_time_and_the_cap() -> None:
    outcome = repeat_until(stream([1.0], 0.125), RepeatPolicy(min_time_s=1.0, budget_s=5.0))
    assert len(outcome.values) == 8  # stable from the start, but the samples must add up to 1 s
    capped = repeat_until(stream([1.0, 2.0, 3.0], 0.0), RepeatPolicy(target_ci_rel=1e-6, max_samples=7))
    assert len(capped.values) == 7 and capped.reason == "max" and capped.budget_limited


def test_median_ci_narrows_with_more_samples_and_ignores_one_outlier() -> None:
    few, many = [1.0, 1.1, 0.9, 1.05, 0.95], [1.0, 1.1, 0.9, 1.05, 0.95] * 8
    assert median_ci_rel(many) < median_ci_rel(few)
    assert median_ci_rel([1.0, 1.0, 1.0, 1.0, 50.0]) == 0.0
    assert median_ci_rel([1.0]) == float("inf")


def test_eval_tokens_scale_with_the_forward_rate_between_the_floor_and_the_request() -> None:
    budget = 30.0
    assert scaled_eval_tokens(2048, 10_000.0, budget) == 2048  # fast: everything asked
    assert scaled_eval_tokens(2048, None, budget) == 2048  # unknown rate: as asked
    slow = scaled_eval_tokens(2048, 80.0, budget)  # half of 80 tok/s x 30 s = 1200 -> 4 whole chunks
    assert slow == 1024 and slow % CHUNK_TOKENS == 0
    assert scaled_eval_tokens(2048, 1.0, budget) == EVAL_TOKENS_FLOOR  # very slow: the floor
    assert scaled_eval_tokens(300, 1.0, budget) == 300  # never more than asked
    assert EVAL_TOKENS_FLOOR // 32 >= 16  # the floor keeps at least 16 bootstrap blocks
