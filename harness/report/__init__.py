"""Comparison reports: trade-off tables, Pareto frontier, recommendation, regressions (issue 5)."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.report import document, plots, regress
from harness.report import formats as writers
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
) -> int:
    """Write the report of `runs` (merged) into `out`; 1 when the regression gate trips, else 0."""
    writers.check_formats(formats)
    runs = [Path(r) for r in runs]
    frame, notes = load_frame(runs)
    frame = add_frontiers(frame)
    out = Path(out) if out is not None else runs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plots.write_plots(frame, out)
    regression, comparisons = [], None
    if baseline is not None:
        base, _ = load_frame([Path(baseline)])
        comparisons = regress.compare_runs(frame, base)
        only = regress.unmatched(frame, base)
        regression = document.regression_section(comparisons, Path(baseline), only, fail_on_regression_pct)
    recommendations = recommend(frame, budget_bytes, quality_tolerance)
    blocks = document.build(frame, runs, images, recommendations, notes, regression)
    written = writers.write_document(blocks, out, formats, title=f"harness report: {', '.join(r.name for r in runs)}")
    for name in ("csv", "parquet"):
        if name in formats:
            written.append(writers.write_frame(frame, out / f"report.{name}"))
            if comparisons is not None:
                written.append(writers.write_frame(comparisons, out / f"regressions.{name}"))
    print(f"report: {', '.join(str(p) for p in written)}")
    failed = regress.tripped(comparisons, fail_on_regression_pct) if comparisons is not None else None
    if failed is not None and not failed.empty:
        for _, r in failed.iterrows():
            print(
                f"regression: {r['model']}/{r['framework']}/{r['precision']}/{r['device']} on {r['hardware']}: "
                f"{r['metric']} {r['worse_pct']:.1f}% worse (p={r['p_value']:.2g}) > {fail_on_regression_pct:g}%",
                file=sys.stderr,
            )
        return 1
    return 0
