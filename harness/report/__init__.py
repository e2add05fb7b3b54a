"""Comparison reports: trade-off tables, Pareto frontier, recommendation, regressions (issue 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from harness.report import cost, document, plots, regress, stacks
from harness.report import formats as writers
from harness.report import history as nightly
from harness.report.finetune import finetune_section
from harness.report.formats import Block
from harness.report.frame import load_frame
from harness.report.pareto import add_frontiers
from harness.report.recommend import recommend

__all__ = ["write_report"]


def write_report(
    runs: list[Path],
    baseline: Path | None = None,
    out: Path | None = None,
    formats: tuple[str, ...] = ("md", "html"),
    budget_bytes: int | None = None,
    fail_on_regression_pct: float | None = None,
    quality_tolerance: float = 0.01,
    history: Path | None = None,
    prices: Path | None = None,
) -> int:
    """Write the report of `runs` (merged) into `out`; 1 when the regression gate trips, else 0.
    `history`: a dir of earlier nights (trends; its newest night is the baseline unless one is
    given); `prices`: a TOML price per hardware label (cost columns). summary.md says what changed."""
    writers.check_formats(formats)
    runs = [Path(r) for r in runs]
    everything, notes = load_frame(runs)
    training = everything[everything["scenario"] == "finetune"]
    frame = add_frontiers(everything[everything["scenario"] != "finetune"].reset_index(drop=True))
    price_table = cost.load_prices(prices) if prices is not None else {}
    if price_table:
        frame = cost.add_costs(frame, price_table)
    out = Path(out) if out is not None else runs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plots.write_plots(frame, out)
    if baseline is None and history is not None:
        baseline = nightly.latest_night(history)
    base, comparisons, regression = _against_baseline(everything, baseline, fail_on_regression_pct)
    if frame.empty and not training.empty:  # the finetune scenario alone: no inference sections
        blocks = [*document.overview(everything, runs), *finetune_section(training, out, budget_bytes), *regression]
    else:
        recommendations = recommend(frame, budget_bytes, quality_tolerance)
        blocks = document.build(frame, runs, images, recommendations, notes, regression)
        blocks += finetune_section(training, out, budget_bytes)
    blocks += stacks.stacks_section(frame)
    if price_table:
        blocks += cost.cost_section(frame, quality_tolerance)
    steps = None
    if history is not None:
        past = nightly.load_history(history, tonight=frame)
        steps = nightly.detect_steps(past)
        blocks += nightly.trend_section(past, steps, nightly.plot_trends(past, steps, out), Path(history))
    if base is not None or history is not None:
        summary = nightly.changes_section(frame, base, comparisons, steps, str(baseline), fail_on_regression_pct)
        blocks = [blocks[0], *summary, *blocks[1:]]
        if "md" in formats:
            (out / "summary.md").write_text(writers.to_markdown(summary), encoding="utf-8")
    written = writers.write_document(blocks, out, formats, title=f"harness report: {', '.join(r.name for r in runs)}")
    written += _write_tables(pd.concat([frame, training], ignore_index=True) if not training.empty else frame,
                             comparisons, out, formats)  # fmt: skip
    print(f"report: {', '.join(str(p) for p in written)}")
    return _gate(comparisons, fail_on_regression_pct)


def _against_baseline(
    everything: pd.DataFrame, baseline: Path | None, gate_pct: float | None
) -> tuple[pd.DataFrame | None, pd.DataFrame | None, list[Block]]:
    """(the baseline's frame, the per-metric comparisons, the regression section); all empty without one."""
    if baseline is None:
        return None, None, []
    base, _ = load_frame([Path(baseline)])
    comparisons = regress.compare_runs(everything, base)  # both scenarios: training steps are sampled too
    only = regress.unmatched(everything, base)
    return base, comparisons, document.regression_section(comparisons, Path(baseline), only, gate_pct)


def _write_tables(
    rows: pd.DataFrame, comparisons: pd.DataFrame | None, out: Path, formats: tuple[str, ...]
) -> list[Path]:
    """report.<csv|parquet> (every row, both scenarios) and regressions.<csv|parquet>, in the formats asked for."""
    written = []
    for name in ("csv", "parquet"):
        if name in formats:
            written.append(writers.write_frame(rows, out / f"report.{name}"))
            if comparisons is not None:
                written.append(writers.write_frame(comparisons, out / f"regressions.{name}"))
    return written


def _gate(comparisons: pd.DataFrame | None, gate_pct: float | None) -> int:
    """1, naming each on stderr, when a significant regression is worse than `gate_pct`; else 0."""
    failed = regress.tripped(comparisons, gate_pct) if comparisons is not None else None
    if failed is None or failed.empty:
        return 0
    for _, r in failed.iterrows():
        print(
            f"regression: {r['model']}/{r['framework']}/{r['precision']}/{r['device']} on {r['hardware']}: "
            f"{r['metric']} {r['worse_pct']:.1f}% worse (p={r['p_value']:.2g}) > {gate_pct:g}%",
            file=sys.stderr,
        )
    return 1
