"""Cost per hardware, from the user's prices: $ per million decoded tokens, per load, per matrix run.

Prices are never built in. They come from a TOML file keyed by hardware label (the label
reports show, `$HARNESS_HARDWARE_LABEL` in CI), e.g. ci/hardware.toml:

    [hardware.a10g]
    price_per_hour = 1.21     # USD per hour of this machine

Hardware without a price gets no cost; without a price file the cost columns do not exist.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import UsageError
from harness.report.formats import Block, Bullets, Heading, Text
from harness.report.frame import KEY
from harness.report.tables import Table, num
from harness.storage import read_environment

SECONDS_PER_HOUR = 3600.0
COST_COLUMNS = ("usd_per_hour", "usd_per_mtok_decoded", "usd_per_million", "usd_per_load", "usd_per_combo_run")


def load_prices(path: Path) -> dict[str, float]:
    """Hardware label -> USD per hour, from `[hardware.<label>] price_per_hour`; labels without one are left out."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--prices {path}: cannot read it ({exc.strerror}); give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--prices {path}: not valid TOML ({exc})") from None
    hardware = data.get("hardware")
    if not isinstance(hardware, dict):
        raise UsageError(f"--prices {path}: no [hardware.<label>] tables; see ci/hardware.toml")
    prices = {}
    for label, entry in hardware.items():
        price = entry.get("price_per_hour") if isinstance(entry, dict) else None
        if price is None:
            continue
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            raise UsageError(f"{path}: [hardware.{label}] price_per_hour must be a non-negative number of USD")
        prices[str(label)] = float(price)
    return prices


def add_costs(frame: pd.DataFrame, prices: dict[str, float]) -> pd.DataFrame:
    """The cost columns, for rows whose hardware label has a price (others stay NaN):
    usd_per_mtok_decoded (causal LMs), usd_per_million (of the row's speed unit: decoded tokens or
    encoded sequences), usd_per_load (one median load), usd_per_combo_run (its measuring worker)."""
    frame = frame.copy()
    per_second = frame["hardware_label"].map(prices).astype(float) / SECONDS_PER_HOUR
    num_ = lambda c: pd.to_numeric(frame[c], errors="coerce")  # noqa: E731
    frame["usd_per_hour"] = per_second * SECONDS_PER_HOUR
    frame["usd_per_million"] = per_second / num_("speed").where(num_("speed") > 0) * 1e6
    frame["usd_per_mtok_decoded"] = frame["usd_per_million"].where(frame["model_kind"] == "causal-lm")
    frame["usd_per_load"] = per_second * num_("load_s")
    frame["usd_per_combo_run"] = per_second * num_("worker_wall_s")
    return frame


def run_wall_s(run_dir: str, finished_at: pd.Series) -> float | None:
    """A run's wall time: environment.json's started_at to its last record."""
    started = read_environment(run_dir).get("started_at")
    ends = pd.to_datetime(finished_at, errors="coerce", utc=True).dropna()
    if not started or ends.empty:
        return None
    return max(0.0, (ends.max() - pd.Timestamp(started)).total_seconds())


def matrix_costs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per priced hardware × stack: the wall time of all its runs (shards add up) and what it cost."""
    rows = []
    priced = frame[frame["usd_per_hour"].notna()]
    for (label, stack), group in priced.groupby(["hardware_label", "stack"], sort=True):
        walls = [run_wall_s(run, g["finished_at"]) for run, g in group.groupby("run_dir", sort=True)]
        wall = float(np.sum([w for w in walls if w is not None])) if any(w is not None for w in walls) else np.nan
        price = float(group["usd_per_hour"].iloc[0])
        rows.append({"hardware_label": label, "stack": stack, "runs": len(walls), "combinations": len(group),
                     "wall_s": wall, "usd_per_hour": price, "usd_per_matrix_run": price * wall / SECONDS_PER_HOUR})  # fmt: skip
    return pd.DataFrame(
        rows,
        columns=["hardware_label", "stack", "runs", "combinations", "wall_s", "usd_per_hour", "usd_per_matrix_run"],
    )


def _usd(value: object) -> str:
    if value is None or pd.isna(value):  # type: ignore[arg-type]
        return "-"
    x = float(value)  # type: ignore[arg-type]
    return f"${x:.2f}" if x >= 1 else f"${x:.3g}"


def cheapest(frame: pd.DataFrame, tolerance: float) -> list[str]:
    """Per model: the cheapest hardware and precision (per million of its speed unit) within the quality tolerance."""
    lines = []
    for model, group in frame.groupby("model", sort=True):
        priced = group[(group["status"] == "ok") & group["usd_per_million"].notna()]
        within = priced[priced["tolerance_loss"] <= tolerance].sort_values(["usd_per_million", *KEY])
        if within.empty:
            if priced.empty:
                reason = "no priced combination ran"
            elif priced["tolerance_loss"].isna().all():
                reason = "no priced combination has a quality measurement (run with quality on)"
            else:
                reason = f"none within tolerance {tolerance:g}"
            lines.append(f"{model}: {reason}.")
            continue
        best = within.iloc[0]
        lines.append(
            f"{model}: cheapest within tolerance {tolerance:g} is {best['precision']} on {best['hardware']} "
            f"({best['framework']}, {best['device']}): {_usd(best['usd_per_million'])} per million "
            f"{str(best['speed_unit']).split()[0]} ({num(best['speed'])} {best['speed_unit']} at "
            f"{_usd(best['usd_per_hour'])}/h)"
        )
    return lines


def cost_section(frame: pd.DataFrame, tolerance: float) -> list[Block]:
    """Cost table per combination × hardware, the cost of a full matrix run, and the cheapest pick."""
    priced = frame[frame["usd_per_hour"].notna()]
    blocks: list[Block] = [Heading("Cost")]
    if priced.empty:
        return [*blocks, Text("No hardware label in these runs has a price in the price file.")]
    blocks.append(Text("From the prices given (USD per hour of each hardware label); time is what this run measured."))
    rows = [
        [str(r["model"]), str(r["framework"]), str(r["precision"]), str(r["device"]), str(r["hardware"]),
         _usd(r["usd_per_hour"]), _usd(r["usd_per_mtok_decoded"]), _usd(r["usd_per_load"]), _usd(r["usd_per_combo_run"])]
        for _, r in priced.iterrows()
    ]  # fmt: skip
    headers = ["model", "framework", "precision", "device", "hardware", "$/h", "$ per M decoded tok", "$ per load",
               "$ in matrix run"]  # fmt: skip
    blocks.append(Table("", headers, rows))
    runs = [
        [str(r["hardware_label"]), str(r["stack"]), str(r["runs"]), str(r["combinations"]), num(r["wall_s"]),
         _usd(r["usd_per_hour"]), _usd(r["usd_per_matrix_run"])]
        for _, r in matrix_costs(frame).iterrows()
    ]  # fmt: skip
    headers = ["hardware", "stack", "runs", "combinations", "wall s", "$/h", "$ per matrix run"]
    blocks.append(Table("Full matrix run", headers, runs))
    blocks += [Heading("Cheapest within tolerance", 3), Bullets(cheapest(frame, tolerance))]
    return blocks
