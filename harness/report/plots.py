"""PNG plots (matplotlib, Agg, no pyplot state): frontier, throughput and load time by precision."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from harness.report.pareto import FRONTIER_GROUP, frontier_points
from harness.units import MIB, MIB_LABEL


def _figure(n: int) -> tuple[Figure, list[Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _panels(rows: pd.DataFrame) -> tuple[Figure, list[tuple[Axes, pd.DataFrame]]] | None:
    """One subplot per model, device and hardware; None when there is nothing to draw."""
    groups = [g for _, g in rows.groupby(FRONTIER_GROUP, sort=True)]
    if not groups:
        return None
    fig, axes = _figure(len(groups))
    return fig, list(zip(axes, groups, strict=True))


def _title(group: pd.DataFrame) -> str:
    first = group.iloc[0]
    return f"{first['model']} on {first['device']}\n{first['hardware']}"


def _point_label(row: pd.Series, several_frameworks: bool) -> str:
    return f"{row['framework']}/{row['precision']}" if several_frameworks else str(row["precision"])


def frontier_figure(frame: pd.DataFrame) -> Figure | None:
    """Weight MiB against quality loss per model and device, each quantizer family its own marker,
    the Pareto frontier as a line; None when no row has both."""
    ok = frame[(frame["status"] == "ok") & frame["quality_loss"].notna() & frame["weight_bytes"].notna()]
    panels = _panels(ok)
    if panels is None:
        return None
    fig, pairs = panels
    markers = "osD^vP*Xh<>"
    families = sorted(ok["family"].unique())
    for ax, group in pairs:
        several = group["framework"].nunique() > 1
        for index, family in enumerate(families):
            points = group[group["family"] == family]
            if not points.empty:
                ax.scatter(points["weight_bytes"] / MIB, points["quality_loss"], marker=markers[index % len(markers)],
                           color=f"C{index}", zorder=2, label=family)  # fmt: skip
        front = frontier_points(group, "memory")
        ax.plot(front["weight_bytes"] / MIB, front["quality_loss"], "-", color="tab:red", zorder=3, label="frontier")
        for _, row in group.iterrows():
            ax.annotate(_point_label(row, several), (row["weight_bytes"] / MIB, row["quality_loss"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
        ax.set_xlabel(f"weight {MIB_LABEL}")
        ax.set_ylabel(f"quality loss ({group['quality_metric'].iloc[0]})")
        ax.set_title(_title(group), fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_frontier(frame: pd.DataFrame, path: Path) -> Path | None:
    """frontier_figure as a PNG at `path`."""
    fig = frontier_figure(frame)
    if fig is None:
        return None
    fig.savefig(path, dpi=90)
    return path


def _bars(
    frame: pd.DataFrame, path: Path, value: Callable[[pd.DataFrame], pd.Series], ylabel: Callable[[pd.DataFrame], str]
) -> Path | None:
    ok = frame[frame["status"] == "ok"].assign(_value=lambda f: value(f))
    ok = ok[ok["_value"].notna()]
    panels = _panels(ok)
    if panels is None:
        return None
    fig, pairs = panels
    for ax, group in pairs:
        several = group["framework"].nunique() > 1
        labels = [_point_label(r, several) for _, r in group.iterrows()]
        ax.bar(labels, group["_value"], color="tab:blue")
        ax.set_ylabel(ylabel(group))
        ax.set_title(_title(group), fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=90)
    return path


def plot_throughput(frame: pd.DataFrame, path: Path) -> Path | None:
    """Decode tok/s (encoders: seq/s) by precision."""
    return _bars(frame, path, lambda f: f["speed"], lambda g: str(g["speed_unit"].iloc[0]))


def plot_load_time(frame: pd.DataFrame, path: Path) -> Path | None:
    """Median load_s by precision."""
    return _bars(frame, path, lambda f: pd.to_numeric(f["load_s"], errors="coerce"), lambda g: "load_s (median)")


PLOTS: dict[str, Callable[[pd.DataFrame, Path], Path | None]] = {
    "frontier.png": plot_frontier,
    "throughput.png": plot_throughput,
    "load_time.png": plot_load_time,
}


def write_plots(frame: pd.DataFrame, out: Path) -> dict[str, Path]:
    """Every plot that has data, by file name."""
    written = {name: plot(frame, out / name) for name, plot in PLOTS.items()}
    return {name: path for name, path in written.items() if path is not None}
