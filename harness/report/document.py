"""The report's content as blocks: overview, tables, frontier, recommendation, regressions, notes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report.formats import Block, Bullets, Heading, Image, Text
from harness.report.pareto import FRONTIER_GROUP, frontier_points
from harness.report.recommend import Recommendation, human_bytes
from harness.report.tables import Table, comparison_tables, compatibility_matrix, num
from harness.units import UNITS_NOTE


def overview(frame: pd.DataFrame, runs: list[Path]) -> list[Block]:
    counts = frame["status"].value_counts().to_dict()
    status = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "failed", "skipped"))
    machines = (
        [
            f"{label}: runs {', '.join(sorted(set(g['run_id'].astype(str))))}"
            for label, g in frame.groupby("hardware", sort=True)
        ]
        if "hardware" in frame
        else []
    )
    return [
        Heading("Benchmark report", 1),
        Text(f"{len(frame)} combinations ({status}) from {', '.join(map(str, runs))}."),
        Heading("Hardware", 3),
        Bullets(machines or ["no records"]),
    ]


def _frontier_text(group: pd.DataFrame, name: str, x: str) -> str:
    points = frontier_points(group, name)
    several = group["framework"].nunique() > 1
    steps = []
    for _, r in points.iterrows():
        label = f"{r['framework']}/{r['precision']}" if several else r["precision"]
        amount = human_bytes(r[x]) if x == "weight_bytes" else f"{num(r[x])} {r['speed_unit']}"
        steps.append(f"{label} ({amount}, loss {num(r['quality_loss'])})")
    return " → ".join(steps) or "-"


def frontier_section(frame: pd.DataFrame, images: dict[str, Path]) -> list[Block]:
    ok = frame[frame["status"] == "ok"]
    rows = []
    for _, group in ok.groupby(FRONTIER_GROUP, sort=True):
        first = group.iloc[0]
        rows.append([
            str(first["model"]), str(first["device"]), str(first["hardware"]), str(first["quality_metric"]),
            _frontier_text(group, "memory", "weight_bytes"), _frontier_text(group, "speed", "speed"),
        ])  # fmt: skip
    blocks: list[Block] = [
        Heading("Pareto frontier"),
        Text(
            "Points no other precision beats on both axes; quality loss is kl_mean for causal LMs, 1 - cosine for encoders."
        ),
        Table("", ["model", "device", "hardware", "loss", "memory vs loss", "speed vs loss"], rows),
    ]
    if "frontier.png" in images:
        blocks.append(Image(images["frontier.png"], "memory against quality loss, frontier in red"))
    return blocks


def regression_section(
    comparisons: pd.DataFrame, baseline: Path, only: tuple[int, int], pct: float | None
) -> list[Block]:
    counts = comparisons["verdict"].value_counts().to_dict() if not comparisons.empty else {}
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("regression", "improvement", "noise", "n/a"))
    blocks: list[Block] = [
        Heading("Against the baseline"),
        Text(
            f"Baseline {baseline}: {len(comparisons)} metric comparisons ({summary}); matched on model, framework, "
            f"precision, device and hardware_id; verdicts from the raw samples (Mann-Whitney U, or a bootstrap of "
            f"the medians when there are too few repeats), p < 0.05."
            + (f" Gate: a significant regression worse than {pct:g}% fails." if pct is not None else "")
        ),
    ]
    if any(only):
        blocks.append(Text(f"Unmatched: {only[0]} combinations only in this run, {only[1]} only in the baseline."))
    rows = [
        [str(r["model"]), str(r["framework"]), str(r["precision"]), str(r["device"]), str(r["hardware"]), str(r["metric"]),
         num(r["base_median"], 4), num(r["new_median"], 4), f"{r['change_pct']:+.1f}%", num(r["p_value"], 2),
         str(r["method"]), str(r["verdict"]).upper() if r["verdict"] == "regression" else str(r["verdict"])]
        for _, r in comparisons.iterrows()
    ]  # fmt: skip
    headers = ["model", "framework", "precision", "device", "hardware", "metric", "baseline", "new", "change", "p",
               "test", "verdict"]  # fmt: skip
    blocks.append(Table("", headers, rows))
    return blocks


def build(
    frame: pd.DataFrame,
    runs: list[Path],
    images: dict[str, Path],
    recommendations: list[Recommendation],
    notes: list[str],
    regression: list[Block],
) -> list[Block]:
    """Every section in reading order."""
    blocks = overview(frame, runs)
    blocks += [Heading("Recommendation"), Bullets([r.sentence for r in recommendations] or ["no records"])]
    blocks += [
        Heading("Per-model comparison"),
        Text(f"Each cell: absolute value (× the reference precision). {UNITS_NOTE}"),
    ]
    blocks += comparison_tables(frame)
    blocks += [Heading("Compatibility matrix"), compatibility_matrix(frame)]
    blocks += frontier_section(frame, images)
    blocks += [Heading("Throughput and load time")]
    blocks += [
        Image(images[n], n.removesuffix(".png").replace("_", " "))
        for n in ("throughput.png", "load_time.png")
        if n in images
    ]
    blocks += regression
    if notes:
        blocks += [Heading("Notes"), Bullets(notes)]
    return blocks
