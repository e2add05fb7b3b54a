"""Console printers: each output format is one small function over records."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

MB = 1 << 20


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) or scale != 1.0:
        return f"{value / scale:.{digits}f}"
    return str(value)


def markdown(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def combo_id(record: dict[str, Any]) -> str:
    return f"{record['model']}-{record['framework']}-{record['precision']}-{record['device']}"


def summary_table(records: Iterable[dict[str, Any]]) -> str:
    """One row per combination: status, load, size, memory, speed and quality at a glance."""
    headers = [
        "combination", "status", "load_s", "weight MB", "peak RSS MB", "device MB",
        "prefill tok/s", "decode tok/s", "encode seq/s", "kl_mean", "cosine", "note",
    ]  # fmt: skip
    rows = []
    for r in records:
        note = r.get("error") or r.get("skip_reason") or ""
        if r.get("error_kind"):
            note = f"{r['error_kind']}: {note}"
        rows.append(
            [
                combo_id(r),
                r["status"],
                _fmt(r.get("load_s"), digits=3),
                _fmt(r.get("weight_bytes"), MB),
                _fmt(r.get("peak_rss_bytes"), MB, 0),
                _fmt(r.get("peak_device_allocated_bytes"), MB),
                _fmt(r.get("prefill_tok_s"), digits=0),
                _fmt(r.get("decode_tok_s"), digits=1),
                _fmt(r.get("encode_samples_s"), digits=1),
                _fmt(r.get("kl_mean"), digits=5),
                _fmt(r.get("embed_cosine_mean"), digits=4),
                note,
            ]
        )
    return markdown(headers, rows)
