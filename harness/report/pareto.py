"""Pareto frontiers per model and device: memory against quality loss, speed against quality loss."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from harness.report.frame import metric_info

FRONTIER_GROUP = ["model", "device", "hardware_id"]
# frontier name -> objectives (column -> "min" or "max", from each metric's declared direction)
FRONTIERS: dict[str, dict[str, str]] = {
    name: {column: metric_info(column).direction for column in axes}
    for name, axes in {"memory": ("weight_bytes", "quality_loss"), "speed": ("speed", "quality_loss")}.items()
}


def pareto_mask(points: pd.DataFrame, objectives: Mapping[str, str]) -> pd.Series:
    """True for points no other point dominates (at least as good everywhere, better somewhere).
    Points missing an objective are never on the frontier; equal points are both kept."""
    signs = np.array([1.0 if how == "min" else -1.0 for how in objectives.values()])
    values = points[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float) * signs
    valid = ~np.isnan(values).any(axis=1)
    on_front = valid.copy()
    for i in np.flatnonzero(valid):
        others = values[valid]
        dominated = (others <= values[i]).all(axis=1) & (others < values[i]).any(axis=1)
        on_front[i] = not dominated.any()
    return pd.Series(on_front, index=points.index)


def add_frontiers(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `on_<name>_frontier` columns, each computed within a model, device and hardware."""
    frame = frame.copy()
    ok = frame["status"] == "ok"
    for name, objectives in FRONTIERS.items():
        column = f"on_{name}_frontier"
        frame[column] = False
        for _, group in frame[ok].groupby(FRONTIER_GROUP, sort=False):
            frame.loc[group.index, column] = pareto_mask(group, objectives)
    return frame


def frontier_points(group: pd.DataFrame, name: str) -> pd.DataFrame:
    """The frontier of one group, ordered along its first objective (best first)."""
    first, how = next(iter(FRONTIERS[name].items()))
    points = group[group[f"on_{name}_frontier"]]
    return points.sort_values(first, ascending=how == "min")
