"""Run against baseline: per metric change with a verdict from the raw samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from harness.records import SAMPLED_METRICS
from harness.report.frame import CONTENDED, KEY, is_contended

# metric -> higher is better, for every Record metric with raw repeats (harness.records.METRICS)
SAMPLE_METRICS: dict[str, bool] = {name: m.higher_is_better for name, m in SAMPLED_METRICS.items()}
ALPHA = 0.05


@dataclass(frozen=True)
class Verdict:
    """How `new` compares with `base`: relative change of the median and its significance."""

    change_frac: float  # median(new) / median(base) - 1
    worse_frac: float  # the change signed so that positive is worse
    p_value: float
    method: str  # mann-whitney | bootstrap | none
    verdict: str  # regression | improvement | noise | n/a


def _min_two_sided_p(n1: int, n2: int) -> float:
    """The smallest p an exact two-sided Mann-Whitney U test can give for these sample sizes."""
    return min(1.0, 2 / comb(n1 + n2, n1))


def _bootstrap_p(base: np.ndarray, new: np.ndarray, n_boot: int, seed: int) -> float:
    """Two-sided bootstrap p for 'the median changed': how often resampled medians cross over."""
    rng = np.random.default_rng(seed)
    base_m = np.median(rng.choice(base, size=(n_boot, base.size)), axis=1)
    new_m = np.median(rng.choice(new, size=(n_boot, new.size)), axis=1)
    diff = new_m - base_m
    return float(min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0))))


def _relative_spread(samples: np.ndarray) -> float:
    return float(np.ptp(samples) / abs(np.median(samples)))


def judge(
    base: Sequence[float],
    new: Sequence[float],
    higher_is_better: bool,
    alpha: float = ALPHA,
    n_boot: int = 4000,
    seed: int = 0,
) -> Verdict:
    """Regression, improvement or noise. Mann-Whitney U when the sample sizes can reach `alpha`;
    otherwise (two or three repeats) a seeded bootstrap of the difference of medians, which
    also needs the change to exceed the relative spread (range / median) of either sample."""
    b = np.asarray([x for x in base if x is not None and np.isfinite(x)], dtype=float)
    n = np.asarray([x for x in new if x is not None and np.isfinite(x)], dtype=float)
    if b.size < 2 or n.size < 2 or np.median(b) == 0:
        change = float(np.median(n) / np.median(b) - 1) if b.size and n.size and np.median(b) else float("nan")
        return Verdict(change, change if not higher_is_better else -change, float("nan"), "none", "n/a")
    change = float(np.median(n) / np.median(b) - 1)
    worse = -change if higher_is_better else change
    if _min_two_sided_p(b.size, n.size) <= alpha:
        p, method = float(mannwhitneyu(n, b, alternative="two-sided").pvalue), "mann-whitney"
    else:
        p, method = _bootstrap_p(b, n, n_boot, seed), "bootstrap"
        if abs(change) <= max(_relative_spread(b), _relative_spread(n)):
            p = max(p, 1.0)  # separated by chance: too few repeats to tell from noise
    if p >= alpha or worse == 0:
        verdict = "noise"
    else:
        verdict = "regression" if worse > 0 else "improvement"
    return Verdict(change, worse, p, method, verdict)


def contention_verdict(verdict: str, metric: str, contended: bool) -> str:
    """The one contention rule, for a run against its baseline (compare_runs) and for a step in the trend
    (history.detect_steps): a timed metric that got worse while other processes used the CPU
    (harness.measure.contention) is `contended`, never a regression. The tables flag the same rows."""
    return CONTENDED if verdict == "regression" and contended and metric in SAMPLE_METRICS else verdict


def compare_runs(new: pd.DataFrame, base: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per matched combination and sampled metric, matched on the stable KEY."""
    ok_new, ok_base = new[new["status"] == "ok"], base[base["status"] == "ok"]
    matched = ok_new.merge(ok_base, on=KEY, suffixes=("", "_base"))
    rows = []
    for _, row in matched.iterrows():
        for metric, higher in SAMPLE_METRICS.items():
            samples = SAMPLED_METRICS[metric].samples
            new_s, base_s = row[samples], row[f"{samples}_base"]
            if not new_s or not base_s:
                continue
            v = judge(base_s, new_s, higher, alpha)
            contended = is_contended(row.get("contended")) or is_contended(row.get("contended_base"))
            verdict = contention_verdict(v.verdict, metric, contended)
            rows.append(
                {k: row[k] for k in [*KEY, "hardware"]}
                | {
                    "metric": metric,
                    "base_median": float(np.median(base_s)),
                    "new_median": float(np.median(new_s)),
                    "change_pct": 100 * v.change_frac,
                    "worse_pct": 100 * v.worse_frac,
                    "p_value": v.p_value,
                    "method": v.method,
                    "verdict": verdict,
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            *KEY,
            "hardware",
            "metric",
            "base_median",
            "new_median",
            "change_pct",
            "worse_pct",
            "p_value",
            "method",
            "verdict",
        ],
    )


def unmatched(new: pd.DataFrame, base: pd.DataFrame) -> tuple[int, int]:
    """How many combinations only the new run, and only the baseline, have."""
    new_keys = set(map(tuple, new[KEY].to_numpy().tolist()))
    base_keys = set(map(tuple, base[KEY].to_numpy().tolist()))
    return len(new_keys - base_keys), len(base_keys - new_keys)


def tripped(comparisons: pd.DataFrame, pct: float | None) -> pd.DataFrame:
    """Significant regressions worse than `pct` percent: what fails the CI gate."""
    if pct is None or comparisons.empty:
        return comparisons.iloc[0:0]
    return comparisons[(comparisons["verdict"] == "regression") & (comparisons["worse_pct"] > pct)]
