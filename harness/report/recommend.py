"""One recommendation sentence per model and device, with the numbers behind it."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness.report.pareto import FRONTIER_GROUP
from harness.units import human_bytes

SAME_QUALITY = 1.1  # a loss within 10 % of another's counts as "the same quality" across families


@dataclass(frozen=True)
class Recommendation:
    """Best-quality precision within the memory budget, fastest precision within tolerance, and the
    best trade across quantizer families."""

    model: str
    device: str
    hardware: str
    budget_bytes: int | None
    best_fit: str | None
    fastest: str | None
    sentence: str


def _label(row: pd.Series, several_frameworks: bool) -> str:
    return f"{row['framework']}/{row['precision']}" if several_frameworks else str(row["precision"])


def _loss_text(row: pd.Series) -> str:
    if row["quality_metric"] == "kl_mean":
        return f"KL {row['quality_loss']:.4g} nats"
    return f"cosine {1 - row['quality_loss']:.4f}"


def _tolerance_text(row: pd.Series) -> str:
    if row["quality_metric"] == "kl_mean":
        return f"ppl {100 * row['tolerance_loss']:+.2f}%"
    return f"1-cosine {row['tolerance_loss']:.2g}"


def across_families(ok: pd.DataFrame, several_frameworks: bool) -> str | None:
    """The largest byte saving one family offers over another at the same or better quality, e.g.
    "quanto-int4 (quanto) gives KL 0.004 nats against nf4's (bitsandbytes) KL 0.005 nats at 8% fewer bytes"."""
    quantized = ok[(ok["family"] != "float") & ok["weight_bytes"].notna()]
    best: tuple[float, pd.Series, pd.Series] | None = None
    for _, a in quantized.iterrows():
        for _, b in quantized[quantized["family"] != a["family"]].iterrows():
            same = a["quality_loss"] <= max(b["quality_loss"] * SAME_QUALITY, 1e-12)
            saving = 1 - a["weight_bytes"] / b["weight_bytes"]
            if same and saving > 0 and (best is None or saving > best[0]):
                best = (saving, a, b)
    if best is None:
        return None
    saving, a, b = best
    return (
        f"across families, {_label(a, several_frameworks)} ({a['family']}) gives {_loss_text(a)} against "
        f"{_label(b, several_frameworks)}'s ({b['family']}) {_loss_text(b)} at {100 * saving:.0f}% fewer weight bytes"
    )


def recommend_group(group: pd.DataFrame, budget_bytes: int | None, tolerance: float) -> Recommendation:
    """The recommendation for one model on one device of one machine."""
    first = group.iloc[0]
    several = group["framework"].nunique() > 1
    ok = group[(group["status"] == "ok") & group["quality_loss"].notna()]
    budget = budget_bytes if budget_bytes is not None else first["device_memory_bytes"]
    budget = None if budget is None or pd.isna(budget) else int(budget)
    where = f"{first['model']} on {first['device']} ({first['hardware']})"
    parts = []
    best = fastest = None
    if ok.empty:
        return Recommendation(first["model"], first["device"], first["hardware"], budget, None, None,
                              f"{where}: no precision ran with a quality measurement, so nothing to recommend.")  # fmt: skip
    source = "--budget-bytes" if budget_bytes is not None else "device memory"
    if budget is None:
        parts.append("the device's memory is unknown, so no budget applies")
    else:
        fits = ok[ok["memory_bytes"] <= budget].sort_values(["quality_loss", "memory_bytes"])
        if fits.empty:
            parts.append(f"no precision fits the {human_bytes(budget)} budget ({source})")
        else:
            row = fits.iloc[0]
            best = _label(row, several)
            parts.append(
                f"within {human_bytes(budget)} ({source}) the best quality is {best} "
                f"({_loss_text(row)}, peak {human_bytes(row['memory_bytes'])})"
            )
    within = ok[(ok["tolerance_loss"] <= tolerance) & ok["speed"].notna()].sort_values("speed", ascending=False)
    if within.empty:
        parts.append(f"no precision with a speed measurement stays within tolerance {tolerance:g}")
    else:
        row = within.iloc[0]
        fastest = _label(row, several)
        rel = row.get("speed_rel")
        rel_text = f", {rel:.2f}× the reference" if rel is not None and pd.notna(rel) else ""
        parts.append(
            f"the fastest within tolerance {tolerance:g} is {fastest} "
            f"({row['speed']:.4g} {row['speed_unit']}{rel_text}, {_tolerance_text(row)})"
        )
    trade = across_families(ok, several)
    if trade:
        parts.append(trade)
    return Recommendation(first["model"], first["device"], first["hardware"], budget, best, fastest,
                          f"{where}: " + "; ".join(parts) + ".")  # fmt: skip


def recommend(frame: pd.DataFrame, budget_bytes: int | None, tolerance: float) -> list[Recommendation]:
    """One recommendation per model, device and hardware."""
    return [recommend_group(group, budget_bytes, tolerance) for _, group in frame.groupby(FRONTIER_GROUP, sort=False)]
