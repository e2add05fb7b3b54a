"""Console printers: each output format is one small function over records."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from harness.plan.matrix import combo_id
from harness.units import MIB, MIB_LABEL


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


def record_id(record: dict[str, Any]) -> str:
    return combo_id(record["model"], record["framework"], record["precision"], record["device"])


def summary_table(records: Iterable[dict[str, Any]]) -> str:
    """One table per scenario in `records` (inference first)."""
    records = list(records)
    training = [r for r in records if r.get("scenario") == "finetune"]
    inference = [r for r in records if r.get("scenario") != "finetune"]
    tables = ([inference_summary_table(inference)] if inference else []) + (
        [finetune_summary_table(training)] if training else []
    )
    return "\n\n".join(tables)


def _note(record: dict[str, Any]) -> str:
    note = record.get("error") or record.get("skip_reason") or ""
    return f"{record['error_kind']}: {note}" if record.get("error_kind") else note


def finetune_summary_table(records: Iterable[dict[str, Any]]) -> str:
    """The finetune scenario: one row per combination, training cost and outcome at a glance."""
    headers = ["combination", "status", "method", "trainable", "step s", "train tok/s", "loss first -> last",
               f"train peak {MIB_LABEL}", f"plan {MIB_LABEL}", "adapter KL", "merged KL", "note"]  # fmt: skip
    rows = []
    for r in records:
        planned = [r.get(f"predicted_train_{p}_bytes") for p in ("forward", "backward", "optimizer")]
        losses = "-" if r.get("loss_first") is None else f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        rows.append([
            record_id(r), r["status"], _fmt(r.get("lora_method")), _fmt(r.get("trainable_params")),
            _fmt(r.get("train_step_s"), digits=3), _fmt(r.get("train_tok_s"), digits=0), losses,
            _fmt(r.get("train_peak_bytes"), MIB, 0), _fmt(max((p for p in planned if p), default=None), MIB, 0),
            _fmt(r.get("adapter_roundtrip_kl"), digits=6), _fmt(r.get("merged_kl"), digits=6), _note(r),
        ])  # fmt: skip
    return markdown(headers, rows)


def inference_summary_table(records: Iterable[dict[str, Any]]) -> str:
    """One row per combination: status, load, size, memory, speed and quality at a glance."""
    headers = [
        "combination", "status", "load_s", f"weight {MIB_LABEL}", f"peak memory {MIB_LABEL}", f"device {MIB_LABEL}",
        "prefill tok/s", "decode tok/s", "encode seq/s", "kl_mean", "cosine", "note",
    ]  # fmt: skip
    rows = []
    for r in records:
        note = _note(r)
        rows.append(
            [
                record_id(r),
                r["status"],
                _fmt(r.get("load_s"), digits=3),
                _fmt(r.get("weight_bytes"), MIB),
                _fmt(r.get("peak_memory_bytes") or r.get("peak_rss_bytes"), MIB, 0),
                _fmt(r.get("peak_device_allocated_bytes"), MIB),
                _fmt(r.get("prefill_tok_s"), digits=0),
                _fmt(r.get("decode_tok_s"), digits=1),
                _fmt(r.get("encode_samples_s"), digits=1),
                _fmt(r.get("kl_mean"), digits=5),
                _fmt(r.get("embed_cosine_mean"), digits=4),
                note,
            ]
        )
    return markdown(headers, rows)


PLAN_COLUMNS = (
    ("model", "model"), ("precision", "precision"), ("weight_bytes", "weights"), ("kv_cache_bytes", "KV"),
    ("activation_bytes", "activations"), ("load_transient_bytes", "load"), ("needed_bytes", "needs"),
)  # fmt: skip
# `harness plan --finetune` rows (harness.plan.preflight.training_plan_table)
TRAINING_PLAN_COLUMNS = (
    ("model", "model"), ("precision", "precision"), ("method", "method"), ("weight_bytes", "weights"),
    ("upcast_bytes", "fp32 upcast"), ("trainable_param_bytes", "trainable"), ("optimizer_state_bytes", "optimizer"),
    ("activation_bytes", "saved activations"), ("forward_bytes", "forward"), ("backward_bytes", "backward"),
    ("optimizer_bytes", "optimizer step"), ("needed_bytes", "needs"),
)  # fmt: skip


def _plan_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    return TRAINING_PLAN_COLUMNS if rows and "backward_bytes" in rows[0] else PLAN_COLUMNS


def _plan_cells(row: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> list[str]:
    from harness.units import human_bytes

    cells = [str(row[k] or "-") if not k.endswith("_bytes") else human_bytes(row[k]) for k, _ in columns]
    cells += [{True: "yes", False: "no", None: "?"}[row[k]] for k in row if k.startswith("fits_")]
    return cells + ([row["notes"]] if columns is TRAINING_PLAN_COLUMNS else [])


def _plan_headers(rows: list[dict[str, Any]]) -> list[str]:
    fits = [k.removeprefix("fits_") for k in rows[0] if k.startswith("fits_")] if rows else []
    columns = _plan_columns(rows)
    notes = ["notes"] if columns is TRAINING_PLAN_COLUMNS else []
    return [label for _, label in columns] + [f"fits {name}" for name in fits] + notes


def plan_text(rows: list[dict[str, Any]]) -> str:
    """An aligned terminal table (needs = peak + the worker runtime; fits leave a 5 % margin)."""
    table = [_plan_headers(rows)] + [_plan_cells(r, _plan_columns(rows)) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def plan_markdown(rows: list[dict[str, Any]]) -> str:
    return markdown(_plan_headers(rows), [_plan_cells(r, _plan_columns(rows)) for r in rows])


def plan_csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().rstrip("\n")


def plan_json(rows: list[dict[str, Any]]) -> str:
    import json

    return json.dumps(rows, indent=2)


def plan_printers() -> dict[str, Any]:
    """`harness plan --format` names and their printers."""
    return {"table": plan_text, "md": plan_markdown, "csv": plan_csv, "json": plan_json}
