"""Tables as (headers, rows) of strings: per-model comparison and the compatibility matrix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from harness.records import METRICS
from harness.report.frame import CONTENDED, is_contended
from harness.units import MIB


@dataclass(frozen=True)
class Table:
    """A titled table of strings, rendered by formats.py."""

    title: str
    headers: list[str]
    rows: list[list[str]]


def _missing(value: object) -> bool:
    return value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value))


def num(value: object, digits: int = 3, scale: float = 1.0) -> str:
    """A number with `digits` significant digits, '-' when missing."""
    if _missing(value):
        return "-"
    x = float(value) / scale  # type: ignore[arg-type]
    return f"{x:.0f}" if abs(x) >= 10**digits else f"{x:.{digits}g}"


def with_rel(value: object, rel: object, is_reference: bool, digits: int = 3, scale: float = 1.0) -> str:
    """`absolute (ratio×)`, e.g. `0.757 (2.95×)`; the reference row says `(ref)`."""
    text = num(value, digits, scale)
    if text == "-":
        return text
    if is_reference:
        return f"{text} (ref)"
    return f"{text} ({float(rel):.2f}×)" if not _missing(rel) else text  # type: ignore[arg-type]


def _kl(row: pd.Series) -> str:
    if _missing(row["kl_mean"]):
        return "-"
    low, high = row["kl_mean_ci_low"], row["kl_mean_ci_high"]
    half = "" if _missing(low) or _missing(high) else f" ± {(high - low) / 2:.2g}"
    return f"{row['kl_mean']:.3g}{half}{_kl_tokens_note(row)}"


def _kl_tokens_note(row: pd.Series) -> str:
    """` (768 of the reference's 2048 tokens)` where the row's KL covers other tokens than its reference's
    outputs, ` (768 tokens)` where rows of one group differ among themselves (e.g. merged runs); else ''."""
    tokens, reference = row["eval_tokens"], row.get("reference_eval_tokens")
    if _missing(tokens):
        return ""
    if not _missing(reference) and int(tokens) != int(reference):
        return f" ({int(tokens)} of the reference's {int(reference)} tokens)"
    return f" ({int(tokens)} tokens)" if bool(row.get("_kl_tokens_differ", False)) else ""


def _mark_kl_tokens(model_rows: pd.DataFrame) -> pd.DataFrame:
    """Flag (column `_kl_tokens_differ`) the rows of groups whose KL rows cover different token counts."""
    from harness.report.frame import GROUP

    rows = model_rows.copy()
    tokens = pd.to_numeric(rows["eval_tokens"], errors="coerce").where(rows["kl_mean"].notna())
    keys = [c for c in GROUP if c in rows.columns]
    rows["_kl_tokens_differ"] = tokens.groupby([rows[c] for c in keys], dropna=False).transform("nunique") > 1
    return rows


def _pct(value: object) -> str:
    return "-" if _missing(value) else f"{100 * float(value):+.2f}%"  # type: ignore[arg-type]


def _rel_col(metric: str, scale: float = 1.0, digits: int = 3) -> Callable[[pd.Series], str]:
    return lambda r: with_rel(
        r[metric], r[f"{metric}_rel"], bool(r["is_reference"]) and r["status"] == "ok", digits, scale
    )


def _plan_weight_error(row: pd.Series) -> str:
    """The memory plan's weights against the measured ones: `+1.2%` means the plan predicted too much."""
    predicted, value = row["predicted_weight_bytes"], row["weight_bytes"]
    if _missing(predicted) or _missing(value) or not value:
        return "-"
    return _pct(float(predicted) / float(value) - 1.0)


def _plan_peak_error(row: pd.Series) -> str:
    """The memory plan's peak against the measured one, like with like: on cpu the host RSS growth
    over the worker's baseline (peak_memory_bytes - rss_before_load_bytes) against
    predicted_host_peak_bytes; on a GPU the allocator's peak against predicted_device_peak_bytes
    (`-` where the device reports no allocator peak, or for records from before these fields)."""
    peak, phase = row["peak_memory_bytes"], row["peak_memory_phase"]
    if _missing(peak):
        return "-"
    if str(row["device"]) == "cpu":
        predicted, base = row["predicted_host_peak_bytes"], row["rss_before_load_bytes"]
        measured = None if _missing(base) else float(peak) - float(base)
    else:
        host_peak = not _missing(phase) and str(phase).startswith("host:")
        predicted, measured = row["predicted_device_peak_bytes"], None if host_peak else float(peak)
    if _missing(predicted) or measured is None or measured <= 0:
        return "-"
    return _pct(float(predicted) / measured - 1.0)


def _label(field: str) -> str:
    """A metric's column header, with its direction: `load_s ↓`, `decode tok/s ↑`."""
    info = METRICS[field]
    return f"{info.label} {'↑' if info.higher_is_better else '↓'}"


def _cold_load(row: pd.Series) -> str:
    """`2.41 (31% of disk)`: the cold load and its bandwidth against the raw read of the same files."""
    text = num(row["load_cold_s"])
    frac = row["load_cold_bandwidth_frac"]
    return text if text == "-" or _missing(frac) else f"{text} ({100 * float(frac):.0f}% of disk)"


def _peak_memory(row: pd.Series) -> str:
    """The headline peak over every phase, with the phase that set it, e.g. `2631 (quality)`."""
    text = num(row["peak_memory_bytes"], 3, MIB)
    phase = row["peak_memory_phase"]
    return text if text == "-" or _missing(phase) else f"{text} ({phase})"


def _contended(row: pd.Series) -> str:
    return CONTENDED if is_contended(row["contended"]) else ""


# header -> (source column that must have a value somewhere for the column to show, cell function)
COMPARISON_COLUMNS: dict[str, tuple[str, Callable[[pd.Series], str]]] = {
    _label("load_s"): ("load_s", _rel_col("load_s")),
    _label("load_cold_s"): ("load_cold_s", _cold_load),
    _label("weight_bytes"): ("weight_bytes", _rel_col("weight_bytes", MIB)),
    "plan weight err": ("predicted_weight_bytes", _plan_weight_error),
    _label("peak_rss_bytes"): ("peak_rss_bytes", _rel_col("peak_rss_bytes", MIB)),
    _label("peak_memory_bytes"): ("peak_memory_bytes", _peak_memory),
    "plan peak err": ("predicted_peak_bytes", _plan_peak_error),
    _label("peak_device_allocated_bytes"): (
        "peak_device_allocated_bytes",
        _rel_col("peak_device_allocated_bytes", MIB),
    ),
    _label("prefill_tok_s"): ("prefill_tok_s", _rel_col("prefill_tok_s")),
    _label("decode_tok_s"): ("decode_tok_s", _rel_col("decode_tok_s")),
    _label("encode_samples_s"): ("encode_samples_s", _rel_col("encode_samples_s")),
    f"{_label('kl_mean')} ± CI": ("kl_mean", _kl),
    _label("ppl_delta_frac"): ("ppl_delta_frac", lambda r: _pct(r["ppl_delta_frac"])),
    _label("top1_agree"): ("top1_agree", lambda r: num(r["top1_agree"], 4)),
    _label("embed_cosine_mean"): ("embed_cosine_mean", lambda r: num(r["embed_cosine_mean"], 5)),
    "machine": ("contended", _contended),
}
ALWAYS = (_label("load_s"), _label("weight_bytes"), _label("peak_rss_bytes"))
LABELS = ("framework", "device", "hardware")  # shown as columns only where they vary


def _label_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in LABELS if frame[c].nunique(dropna=False) > 1]


def comparison_table(model_rows: pd.DataFrame) -> Table:
    """One model: a row per precision (and framework, device, hardware where several), each
    metric absolute and relative to the reference precision of its framework and device."""
    model = str(model_rows["model"].iloc[0])
    labels = _label_columns(model_rows)
    shown = [h for h, (src, _) in COMPARISON_COLUMNS.items() if h in ALWAYS or model_rows[src].notna().any()]
    headers = [*labels, "precision", "family", "status", *shown]
    rows = []
    for _, r in _mark_kl_tokens(model_rows).iterrows():
        status = str(r["status"]) + (f" ({r['error_kind']})" if not _missing(r["error_kind"]) else "")
        identity = [str(r["precision"]), str(r["family"]), status]
        rows.append([str(r[c]) for c in labels] + identity + [COMPARISON_COLUMNS[h][1](r) for h in shown])
    refs = sorted(set(model_rows["reference_precision"].dropna()))
    title = f"{model}" + (f" (relative to {', '.join(refs)})" if refs else "")
    return Table(title, headers, rows)


def comparison_tables(frame: pd.DataFrame) -> list[Table]:
    return [comparison_table(group) for _, group in frame.groupby("model", sort=True)]


def cell(row: pd.Series, limit: int = 60) -> str:
    """ok, failed (kind) or skipped: reason."""
    if row["status"] == "failed":
        return f"failed ({row['error_kind'] or 'error'})"
    if row["status"] == "skipped":
        reason = str(row["skip_reason"] or "")
        reason = reason if len(reason) <= limit else reason[: limit - 3] + "..."
        return f"skipped: {reason}" if reason else "skipped"
    return str(row["status"])


def compatibility_matrix(frame: pd.DataFrame) -> Table:
    """model × framework × device (× hardware) rows, one column per precision."""
    precisions = list(dict.fromkeys(frame.sort_values(["precision_rank", "precision"])["precision"]))
    keys = ["model", "framework", "device"] + (["hardware"] if frame["hardware"].nunique() > 1 else [])
    rows = []
    for key, group in frame.groupby(keys, sort=True):
        cells = {r["precision"]: cell(r) for _, r in group.iterrows()}
        rows.append([str(k) for k in key] + [cells.get(p, "not run") for p in precisions])
    return Table("", [*keys, *precisions], rows)
