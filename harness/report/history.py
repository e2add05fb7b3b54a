"""Many nights: trends per combination × hardware × stack, step detection, and what changed.

A history dir holds one sub-directory per night, named so that names sort by time (the nightly
workflow uses `YYYYMMDD-HHMMSS-<run>`), each holding that night's run dirs at any depth. A step
is the last `recent` nights against the `window` nights before them, judged on the nightly
values with `regress.judge` (Mann-Whitney U, or the bootstrap when there are too few nights) and
kept only beyond `min_change_pct`: one noisy night among the recent ones cannot make a step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D

from harness.records import Record
from harness.report import regress
from harness.report.formats import Block, Bullets, Heading, Image, Text
from harness.report.frame import KEY, RUN_COLUMNS, add_derived, dedupe, is_contended, run_rows
from harness.report.pareto import FRONTIERS
from harness.report.plots import _figure
from harness.report.regress import ALPHA, SAMPLE_METRICS, contention_verdict, judge
from harness.report.tables import Table, num
from harness.storage import RESULTS_FILE, find_run_dirs

RECENT_NIGHTS = 3
WINDOW_NIGHTS = 14  # two weeks: one outlier night inside the window still leaves a 3-night step at p = 0.02
MIN_CHANGE_PCT = 10.0
TONIGHT = "tonight"
SUMMARY_LINES = 10  # per section of the morning summary


def trend_metrics() -> dict[str, bool]:
    """Metric -> higher is better: the sampled metrics (regress) and the Pareto axes (pareto),
    without `speed`, which is decode_tok_s or encode_samples_s again."""
    frontier = {m: how == "max" for axes in FRONTIERS.values() for m, how in axes.items() if m != "speed"}
    return dict(SAMPLE_METRICS) | frontier


def night_dirs(history: Path) -> list[Path]:
    """The nights of a history dir, oldest first (by name); dirs without any run are left out."""
    history = Path(history)
    if not history.is_dir():
        return []
    return sorted(d for d in history.iterdir() if d.is_dir() and next(d.rglob(RESULTS_FILE), None) is not None)


def latest_night(history: Path) -> Path | None:
    nights = night_dirs(history)
    return nights[-1] if nights else None


def load_history(history: Path, tonight: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every night's records (duplicates within a night dropped as a report drops them), stacked,
    with `night` (its name) and `night_index` (0 = oldest); `tonight` (this report's frame) is the
    newest night. Per-row derived columns (hardware, quality_loss, ...) are computed once for all
    nights; the `*_rel` columns, relative to a reference within one night, are left out."""
    names, rows = [], []
    for night in night_dirs(history):
        names.append(night.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged old night was reported the night it ran
            for run in find_run_dirs([night]):
                rows += [dict(r, night=night.name) for r in run_rows(run) or []]
    frames = []
    if rows:
        past = pd.DataFrame(rows, columns=[*Record.field_names(), *RUN_COLUMNS, "night"])
        frames.append(dedupe(past, within=("night",))[0])
    if tonight is not None and not tonight.empty:
        frames.append(tonight.assign(night=TONIGHT))
    if not frames:
        return pd.DataFrame(columns=[*KEY, "hardware", "status", "night", "night_index"])
    nights = [*names, TONIGHT]
    stacked = add_derived(pd.concat(frames, ignore_index=True))
    stacked = stacked.drop(columns=[c for c in stacked.columns if c.endswith("_rel")]).copy()  # one block, not hundreds
    stacked["night_index"] = stacked["night"].map({n: i for i, n in enumerate(nights)})
    return stacked


NO_LORA_RANK = -1  # stands for lora_rank's NaN (an inference row) where a key must compare equal to itself


def keyable(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with lora_rank's NaN replaced by NO_LORA_RANK, so that pivots and lookups on KEY keep
    inference rows (pandas drops NaN group keys, and NaN never equals NaN in a tuple)."""
    return frame.assign(lora_rank=frame["lora_rank"].astype(float).fillna(NO_LORA_RANK))


def nightly_values(ok: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per series (KEY), one column per night_index: the metric's nightly value."""
    return ok.assign(_v=pd.to_numeric(ok[metric], errors="coerce")).pivot_table(
        index=KEY, columns="night_index", values="_v", aggfunc="last"
    )


def detect_steps(
    history: pd.DataFrame,
    recent: int = RECENT_NIGHTS,
    window: int = WINDOW_NIGHTS,
    min_change_pct: float = MIN_CHANGE_PCT,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Series whose last `recent` nights (all of them the newest nights) differ significantly,
    and by more than `min_change_pct`, from the up to `window` nights before. A timed metric's step
    down where any recent night was contended gets the verdict `contended` (regress.contention_verdict)."""
    columns = [*KEY, "hardware", "metric", "since", "window_median", "recent_median", "change_pct", "worse_pct",
               "p_value", "method", "verdict"]  # fmt: skip
    ok = keyable(history[history["status"] == "ok"])
    if ok.empty:
        return pd.DataFrame(columns=columns)
    newest = list(range(int(history["night_index"].max()) - recent + 1, int(history["night_index"].max()) + 1))
    hardware = ok.drop_duplicates(KEY, keep="last").set_index(KEY)["hardware"]
    night_names = ok.drop_duplicates("night_index").set_index("night_index")["night"]
    contention = nightly_values(ok.assign(contended=ok["contended"].map(is_contended)), "contended")
    rows = []
    for metric, higher in trend_metrics().items():
        nightly = nightly_values(ok, metric)
        if not set(newest) <= set(nightly.columns):
            continue
        earlier = [c for c in nightly.columns if c < newest[0]]
        for key, row in nightly[nightly[newest].notna().all(axis=1)].iterrows():
            last, before = row[newest].to_numpy(float), row[earlier].dropna().to_numpy(float)[-window:]
            if len(before) < 2 or np.median(before) == 0:
                continue
            if abs(np.median(last) / np.median(before) - 1) < min_change_pct / 100:
                continue  # too small to report whatever the test says
            verdict = judge(before.tolist(), last.tolist(), higher, alpha)
            if verdict.verdict not in ("regression", "improvement"):
                continue
            recent_contended = bool(np.nansum(contention.loc[key, newest].to_numpy(float)) > 0)
            rows.append(
                dict(zip(KEY, key, strict=True))
                | {
                    "hardware": hardware.loc[key],
                    "metric": metric,
                    "since": str(night_names.loc[newest[0]]),
                    "window_median": float(np.median(before)),
                    "recent_median": float(np.median(last)),
                    "change_pct": 100 * verdict.change_frac,
                    "worse_pct": 100 * verdict.worse_frac,
                    "p_value": verdict.p_value,
                    "method": verdict.method,
                    "verdict": contention_verdict(verdict.verdict, metric, recent_contended),
                }
            )
    steps = pd.DataFrame(rows, columns=columns)
    return steps.assign(lora_rank=steps["lora_rank"].replace(NO_LORA_RANK, np.nan))


def plot_trends(history: pd.DataFrame, steps: pd.DataFrame, out: Path) -> dict[str, Path]:
    """`trend_<metric>.png`: one panel per model and device, one line per precision × hardware ×
    stack over the nights, coloured by precision; series with a step are drawn thick, in red."""
    written: dict[str, Path] = {}
    ok = keyable(history[history["status"] == "ok"])
    if ok.empty or ok["night_index"].nunique() < 2:
        return written
    ticks = sorted(ok["night_index"].unique())
    stepped = {tuple(r) for r in keyable(steps)[[*KEY, "metric"]].itertuples(index=False)} if not steps.empty else set()
    precisions = sorted(ok["precision"].unique())
    hardware = ok.drop_duplicates(KEY, keep="last").set_index(KEY)["hardware"]
    palette = {p: f"C{i % 10}" for i, p in enumerate(precisions)}
    for metric in trend_metrics():
        nightly = nightly_values(ok, metric)
        if nightly.empty:
            continue
        nights = nightly.columns.to_numpy(float)
        panels = list(nightly.groupby(level=["model", "device"], sort=True))
        fig, axes = _figure(len(panels))
        for ax, ((model, device), group) in zip(axes, panels, strict=True):
            lines, colours = [], []
            for key, row in zip(group.index, group.to_numpy(float), strict=True):
                keep = ~np.isnan(row)
                points = np.column_stack([nights[keep], row[keep]])
                precision = key[KEY.index("precision")]
                if (*key, metric) in stepped:
                    label = f"step: {precision} · {hardware.loc[key]}"
                    ax.plot(points[:, 0], points[:, 1], "-o", color="tab:red", linewidth=2.5, markersize=3, label=label)
                else:
                    lines.append(points)
                    colours.append(palette[precision])
            ax.add_collection(LineCollection(lines, colors=colours, linewidths=0.8))  # one artist: fast to draw
            ax.autoscale()
            ax.set_title(f"{model} on {device}", fontsize=9)
            ax.set_ylabel(metric)
            ax.set_xlabel("night")
            ax.set_xticks(ticks[:: max(1, len(ticks) // 8)])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        handles = [Line2D([], [], color=palette[p], label=p) for p in precisions]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
        name = f"trend_{metric}.png"
        fig.savefig(out / name, dpi=72)
        written[name] = out / name
    return written


def _key_text(row: pd.Series) -> str:
    return f"{row['model']}/{row['framework']}/{row['precision']}/{row['device']} on {row['hardware']}"


def trend_section(
    history: pd.DataFrame, steps: pd.DataFrame, images: dict[str, Path], history_dir: Path
) -> list[Block]:
    nights = history["night"].nunique() if not history.empty else 0
    blocks: list[Block] = [
        Heading("Trends"),
        Text(
            f"{nights} nights from {history_dir} (with tonight). A step is the last {RECENT_NIGHTS} nights against "
            f"the {WINDOW_NIGHTS} before them, on the nightly values (Mann-Whitney U, or a bootstrap when there are "
            f"few nights), p < {ALPHA:g} and beyond {MIN_CHANGE_PCT:g}%: a single noisy night is not a step."
        ),
    ]
    rows = [
        [_key_text(r), str(r["metric"]), str(r["since"]), num(r["window_median"], 4), num(r["recent_median"], 4),
         f"{r['change_pct']:+.1f}%", num(r["p_value"], 2), str(r["verdict"])]
        for _, r in steps.iterrows()
    ]  # fmt: skip
    headers = ["combination", "metric", "since", "before", "recent", "change", "p", "verdict"]
    blocks.append(Table("", headers, rows) if rows else Text("No step in any series."))
    blocks += [Image(path, name.removesuffix(".png").replace("_", " ")) for name, path in sorted(images.items())]
    return blocks


# --- what changed since the baseline ---------------------------------------------------------------


def outcomes(frame: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Tonight's rows with the baseline's `status_base` beside them ("absent" where it lacks one)."""
    merged = frame.merge(base[[*KEY, "status"]], on=KEY, how="left", suffixes=("", "_base"))
    merged["status_base"] = merged["status_base"].fillna("absent")
    return merged


def status_changes(frame: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Each combination whose outcome differs from the baseline's: `change` is new-failure,
    fixed, or other (e.g. now skipped); new failures come first."""
    columns = [*KEY, "hardware", "status", "status_base", "error_kind", "error", "change"]
    merged = outcomes(frame, base)
    changed = merged[merged["status"] != merged["status_base"]].copy()
    changed["change"] = np.select(
        [changed["status"] == "failed", changed["status_base"] == "failed"], ["new-failure", "fixed"], "other"
    )
    order = {"new-failure": 0, "fixed": 1, "other": 2}
    changed = changed.sort_values(["change", *KEY], key=lambda c: c.map(order) if c.name == "change" else c)
    return changed[columns].reset_index(drop=True)


def unsampled_changes(frame: pd.DataFrame, base: pd.DataFrame, min_change_pct: float) -> pd.DataFrame:
    """Metrics without raw samples (size, quality loss) that moved beyond `min_change_pct`."""
    metrics = {m: h for m, h in trend_metrics().items() if m not in SAMPLE_METRICS}
    ok_new, ok_base = frame[frame["status"] == "ok"], base[base["status"] == "ok"]
    matched = ok_new.merge(ok_base[[*KEY, *metrics]], on=KEY, suffixes=("", "_base"))
    rows = []
    for _, row in matched.iterrows():
        for metric, higher in metrics.items():
            new, old = (
                pd.to_numeric(row[metric], errors="coerce"),
                pd.to_numeric(row[f"{metric}_base"], errors="coerce"),
            )
            if pd.isna(new) or pd.isna(old) or old == 0:
                continue
            change = 100 * (new / old - 1)
            if abs(change) >= min_change_pct:
                worse = -change if higher else change
                rows.append({k: row[k] for k in [*KEY, "hardware"]} | {
                    "metric": metric, "base": float(old), "new": float(new), "change_pct": change,
                    "verdict": "regression" if worse > 0 else "improvement",
                })  # fmt: skip
    return pd.DataFrame(rows, columns=[*KEY, "hardware", "metric", "base", "new", "change_pct", "verdict"])


def _verdict_lines(comparisons: pd.DataFrame, verdict: str, min_pct: float) -> list[str]:
    """Significant changes of one verdict beyond `min_pct`, the largest first."""
    chosen = comparisons[(comparisons["verdict"] == verdict) & (comparisons["change_pct"].abs() > min_pct)]
    chosen = chosen.sort_values("worse_pct", ascending=verdict != "regression")
    return [
        f"{_key_text(r)}: {r['metric']} {num(r['base_median'], 4)} → {num(r['new_median'], 4)} "
        f"({r['change_pct']:+.1f}%, p={r['p_value']:.2g}, {r['method']})"
        for _, r in chosen.iterrows()
    ]


def changes_section(
    frame: pd.DataFrame,
    base: pd.DataFrame | None,
    comparisons: pd.DataFrame | None,
    steps: pd.DataFrame | None,
    baseline_name: str,
    gate_pct: float | None,
    min_change_pct: float = MIN_CHANGE_PCT,
    max_lines: int = SUMMARY_LINES,
) -> list[Block]:
    """The morning summary: only what changed, new failures first, each with its numbers (at most
    `max_lines` per section, the largest changes first; the report has every one)."""
    counts = frame["status"].value_counts().to_dict()
    platforms = frame.groupby(["hardware_label", "stack"]).ngroups
    blocks: list[Block] = [
        Heading("What changed"),
        Text(
            f"This run: {len(frame)} combinations on {platforms} hardware × stack "
            f"({', '.join(f'{counts.get(s, 0)} {s}' for s in ('ok', 'failed', 'skipped'))}); "
            + (f"baseline {baseline_name}." if base is not None else "no baseline (first night).")
        ),
    ]
    listed_pct = min(gate_pct, min_change_pct) if gate_pct is not None else min_change_pct
    shown = [(title, lines) for title, lines in _change_lists(frame, base, comparisons, steps, listed_pct,
                                                              min_change_pct) if lines]  # fmt: skip
    for title, lines in shown:
        more = [f"… and {len(lines) - max_lines} more in the report"] if len(lines) > max_lines else []
        blocks += [Heading(f"{title} ({len(lines)})", 3), Bullets(lines[:max_lines] + more)]
    if not shown:
        blocks.append(Text("Nothing changed: same outcomes, no significant change in any metric."))
    return blocks + _change_footnotes(frame, base, comparisons, gate_pct, listed_pct)


def _change_lists(
    frame: pd.DataFrame,
    base: pd.DataFrame | None,
    comparisons: pd.DataFrame | None,
    steps: pd.DataFrame | None,
    listed_pct: float,
    min_change_pct: float,
) -> list[tuple[str, list[str]]]:
    """(title, one line per change) for each kind of change, in the summary's order: outcomes, then
    sampled metrics, then size and quality, then steps in the trend."""
    sections: list[tuple[str, list[str]]] = []
    if base is not None:
        status = status_changes(frame, base)
        for change, title in (("new-failure", "New failures"), ("fixed", "Fixed")):
            rows = status[status["change"] == change]
            sections.append((title, [
                f"{_key_text(r)}: {r['status_base']} → {r['status']}"
                + (f" ({r['error_kind']}: {r['error']})" if r["status"] == "failed" else "")
                for _, r in rows.iterrows()
            ]))  # fmt: skip
        other = status[status["change"] == "other"]
        sections.append(("Other outcome changes", [f"{_key_text(r)}: {r['status_base']} → {r['status']}"
                                                   for _, r in other.iterrows()]))  # fmt: skip
    if comparisons is not None:
        for verdict, title in (("regression", "Significant regressions"), ("improvement", "Significant improvements")):
            sections.append((f"{title} beyond {listed_pct:g}%", _verdict_lines(comparisons, verdict, listed_pct)))
    if base is not None:
        moved = unsampled_changes(frame, base, min_change_pct)
        sections.append((f"Size and quality changes beyond {min_change_pct:g}%", [
            f"{_key_text(r)}: {r['metric']} {num(r['base'], 4)} → {num(r['new'], 4)} ({r['change_pct']:+.1f}%, {r['verdict']})"
            for _, r in moved.iterrows()
        ]))  # fmt: skip
    if steps is not None:
        sections.append(("Steps in the trend", [
            f"{_key_text(r)}: {r['metric']} {num(r['window_median'], 4)} → {num(r['recent_median'], 4)} since "
            f"{r['since']} ({r['change_pct']:+.1f}%, p={r['p_value']:.2g}, {r['verdict']})"
            for _, r in steps.iterrows()
        ]))  # fmt: skip
    return sections


def _change_footnotes(
    frame: pd.DataFrame,
    base: pd.DataFrame | None,
    comparisons: pd.DataFrame | None,
    gate_pct: float | None,
    listed_pct: float,
) -> list[Block]:
    """What the lists leave out (failures that did not change, smaller changes) and the gate's verdict."""
    blocks: list[Block] = []
    if base is not None:
        both = outcomes(frame, base)
        still = int(((both["status"] == "failed") & (both["status_base"] == "failed")).sum())
        if still:
            blocks.append(Text(f"{still} combinations still fail as they did in the baseline."))
    if comparisons is not None:
        significant = comparisons["verdict"].isin(["regression", "improvement"])
        smaller = int((significant & (comparisons["change_pct"].abs() <= listed_pct)).sum())
        if smaller:
            blocks.append(Text(f"{smaller} smaller significant changes (within {listed_pct:g}%) are in the report."))
    if gate_pct is not None and comparisons is not None:
        tripped = regress.tripped(comparisons, gate_pct)
        blocks.append(Text(f"Gate: {len(tripped)} significant regressions worse than {gate_pct:g}%"
                           + (" — FAILED." if len(tripped) else " — passed.")))  # fmt: skip
    return blocks
