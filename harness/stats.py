"""When to stop repeating a timed phase: a confidence target on the median, or a time budget.

Like pytest-benchmark's min_rounds/max_time and hyperfine's: a phase repeats until the 95 %
confidence interval of its median is narrower than `target_ci_rel` of the median (relative
half-width), or until its samples add up to `budget_s`, never with fewer than `min_samples`.
A phase that stopped at the budget before reaching the target is "budget limited": its record
says so, and its CI says how loose the median is.

The interval is the robust normal approximation of the median's sampling error,
half-width = t(0.975, n-1) x 1.2533 x 1.4826 x MAD / sqrt(n)
(1.4826 x MAD estimates sigma without being moved by outliers; 1.2533 = sqrt(pi/2) is the
median's standard error over the mean's for normal samples; Student's t widens it for small n).
Pure functions: no clocks here, so synthetic sample streams test every rule.
The summaries of repeated samples (median and IQR, the CI or None, the load repeats' page-cache
residency) are here too: the parent uses them and imports no measuring module.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TARGET_CI_REL = 0.05  # stop once the median's 95 % CI half-width is below 5 % of it
DEFAULT_TIME_BUDGET_S = 2.0  # per timed phase: zoo phases take ~0.5 s today, so this keeps their wall close
MIN_SAMPLES = 3
MAX_SAMPLES = 200  # a safety cap for very fast, very noisy phases

# Student's t, two-sided 95 %, by degrees of freedom (1..30); 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def median_iqr(samples: list[float]) -> tuple[float, float]:
    """Median and interquartile range (0 for fewer than two samples)."""
    if len(samples) < 2:
        return samples[0], 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return statistics.median(samples), q3 - q1


def ci_rel_or_none(values: list[float]) -> float | None:
    """median_ci_rel, None where it is undefined (fewer than 2 samples)."""
    ci = median_ci_rel(values)
    return None if ci == float("inf") else ci


def load_residency_fields(loads: list[dict[str, Any]], reasons: dict[str, str]) -> dict[str, Any]:
    """Page-cache residency before each warm load behind load_s (`loads`: the workers' fields, in
    load_s_samples' order): the samples, and their minimum, so one partly cold sample shows."""
    name = "page_cache_resident_frac_before_load"
    samples = [fields.get(name) for fields in loads]
    known = [s for s in samples if s is not None]
    if not known:
        reasons[name] = "no residency read: the checkpoint is not a local directory of weight files"
        return {name: None, f"{name}_samples": samples}
    reasons.pop(name, None)
    return {name: min(known), f"{name}_samples": samples}


def t975(dof: int) -> float:
    """Two-sided 95 % Student t quantile for `dof` degrees of freedom (>= 1)."""
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def median_ci_rel(samples: Sequence[float]) -> float:
    """Relative half-width of the median's 95 % CI (inf for fewer than 2 samples or a zero median)."""
    if len(samples) < 2:
        return math.inf
    median = statistics.median(samples)
    if median == 0:
        return math.inf
    mad = statistics.median(abs(s - median) for s in samples)
    half_width = t975(len(samples) - 1) * 1.2533 * 1.4826 * mad / math.sqrt(len(samples))
    return half_width / abs(median)


@dataclass(frozen=True)
class RepeatPolicy:
    """The stopping rule of one timed phase."""

    target_ci_rel: float = DEFAULT_TARGET_CI_REL
    budget_s: float = DEFAULT_TIME_BUDGET_S  # seconds of timed samples per phase (warm-up not counted)
    min_samples: int = MIN_SAMPLES
    min_time_s: float = 0.0  # keep repeating until the samples add up to this much (timer resolution)
    max_samples: int = MAX_SAMPLES

    def __post_init__(self) -> None:
        if self.min_samples < MIN_SAMPLES:
            raise ValueError(f"min_samples must be at least {MIN_SAMPLES}, got {self.min_samples}")
        if self.target_ci_rel <= 0 or self.budget_s <= 0:
            raise ValueError("target_ci_rel and budget_s must be positive")


def policy_for(options: object) -> RepeatPolicy:
    """The policy RunOptions asks for (`time_budget_s`, `target_ci_rel`, `timing_repeats`, `min_timing_s`);
    options without the newer fields get the defaults."""
    return RepeatPolicy(
        target_ci_rel=getattr(options, "target_ci_rel", DEFAULT_TARGET_CI_REL),
        budget_s=getattr(options, "time_budget_s", DEFAULT_TIME_BUDGET_S),
        min_samples=max(MIN_SAMPLES, getattr(options, "timing_repeats", MIN_SAMPLES)),
        min_time_s=getattr(options, "min_timing_s", 0.0),
    )


def stop_reason(values: Sequence[float], spent_s: float, policy: RepeatPolicy) -> str | None:
    """Why to stop now ("ci": target reached, "budget": time spent, "max": cap), or None to go on."""
    if len(values) < policy.min_samples or spent_s < policy.min_time_s:
        if len(values) < policy.max_samples:
            return None
    if median_ci_rel(values) < policy.target_ci_rel:
        return "ci"
    if spent_s >= policy.budget_s:
        return "budget"
    if len(values) >= policy.max_samples:
        return "max"
    return None


@dataclass
class RepeatOutcome:
    """The samples of one phase and how it stopped."""

    values: list[float] = field(default_factory=list)
    spent_s: float = 0.0
    reason: str = ""  # ci | budget | max

    @property
    def ci_rel(self) -> float | None:
        ci = median_ci_rel(self.values)
        return None if math.isinf(ci) else ci

    @property
    def budget_limited(self) -> bool:
        """Stopped by the budget (or the cap) before the CI target was reached."""
        return self.reason in ("budget", "max")


def repeat_until(sample: Callable[[], tuple[float, float]], policy: RepeatPolicy) -> RepeatOutcome:
    """Call `sample` -> (value, seconds it took) until `stop_reason` says stop."""
    outcome = RepeatOutcome()
    while True:
        value, seconds = sample()
        outcome.values.append(value)
        outcome.spent_s += seconds
        reason = stop_reason(outcome.values, outcome.spent_s, policy)
        if reason is not None:
            outcome.reason = reason
            return outcome
