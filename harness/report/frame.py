"""Runs become one tidy DataFrame: one row per combination and hardware, newest run kept."""

from __future__ import annotations

import json
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import UsageError
from harness.records import METRICS, SCHEMA_VERSION, Metric, Record
from harness.registry import family_of, precision_order
from harness.storage import find_run_dirs, read_environment, read_records, results_file
from harness.units import MIB_LABEL

# A combination on one machine with one software stack, in one scenario (a LoRA rank of the finetune
# scenario is its own row): different stacks are never duplicates.
CONTENDED = "contended"  # the flag in the tables' machine column and the verdict contention_verdict gives
KEY = ["model", "framework", "precision", "device", "hardware_id", "stack", "scenario", "lora_rank"]
GROUP = ["model", "framework", "device", "hardware_id", "stack", "scenario"]  # rows sharing one reference precision
STACK_LIBRARIES = (
    "torch", "transformers", "bitsandbytes", "torchao", "optimum-quanto", "hqq", "tensorflow", "tensorflow-cpu",
    "keras", "keras-hub", "jax", "llama-cpp-python",
)  # fmt: skip
LIST_COLUMNS = [f.name for f in fields(Record) if f.default_factory in (list, dict)]  # type: ignore[comparison-overlap]
# Columns add_derived makes that act as metrics, declared like the Record's (harness.records.Metric)
DERIVED_METRICS: dict[str, Metric] = {
    "quality_loss": Metric("nats or 1-cosine", False, "quality", label="quality loss"),
    "speed": Metric("tok/s or seq/s", True, "throughput", label="speed"),
    "memory_bytes": Metric("bytes", False, "memory", label=f"peak memory {MIB_LABEL}"),
}


def is_contended(flag: Any) -> bool:
    """A record's `contended` cell, whatever pandas made of the column (a numpy bool in an all-bool
    column, a Python bool, None or NaN in a mixed one, 1.0 after a pivot): None and NaN are not."""
    return flag is not None and not pd.isna(flag) and bool(flag)


def metric_info(column: str) -> Metric:
    """The declared unit and direction of a Record metric or a derived column."""
    info = METRICS.get(column) or DERIVED_METRICS.get(column)
    if info is None:
        raise KeyError(f"{column!r} is not a declared metric (harness.records.METRICS or DERIVED_METRICS)")
    return info


REL_METRICS = (
    "load_s", "load_cold_s", "weight_bytes", "peak_rss_bytes", "peak_memory_bytes", "peak_device_allocated_bytes",
    "prefill_tok_s", "decode_tok_s", "encode_samples_s", "memory_bytes", "speed",
)  # fmt: skip


def check_schema(file: Path) -> None:
    """Warn, naming file and line, about records of another schema_version; records of this
    version that merely lack newer fields get one warning per file, at the first such line."""
    known = set(Record.field_names())
    lacking: list[int] = []
    missing_names: set[str] = set()
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # read_records warns about damaged lines
            if not isinstance(data, dict) or not {"model", "precision", "status"} <= data.keys():
                continue
            version, missing = data.get("schema_version"), sorted(known - data.keys())
            if version != SCHEMA_VERSION:
                shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
                warnings.warn(
                    f"{file}:{number}: record of schema_version {version} (this harness reads "
                    f"{SCHEMA_VERSION}); missing fields read as null{': ' + shown if shown else ''}",
                    stacklevel=2,
                )
            elif missing:
                lacking.append(number)
                missing_names.update(missing)
    if lacking:
        warnings.warn(
            f"{file}:{lacking[0]}: {len(lacking)} records written before fields "
            f"{', '.join(sorted(missing_names))} existed; read as null",
            stacklevel=2,
        )


def device_memory(device: str, env: dict[str, Any]) -> int | None:
    """Total memory of the device a combination ran on: host RAM for cpu, the GPU's for cuda:N."""
    if device == "cpu":
        return env.get("ram_bytes") or None
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        gpus = env.get("gpus") or []
        return gpus[index].get("memory_bytes") if index < len(gpus) else None
    return None


def stack_versions(env: dict[str, Any]) -> str:
    """The versions that decide what loads, e.g. `torch 2.13.0, transformers 5.24.0, bitsandbytes 0.50.2`."""
    libraries = env.get("libraries") or {}
    return ", ".join(f"{name} {libraries[name]}" for name in STACK_LIBRARIES if name in libraries)


def stack_name(env: dict[str, Any]) -> str:
    """A run's software stack: its name ($HARNESS_STACK), else its library versions."""
    return env.get("stack") or stack_versions(env) or "unknown"


RUN_COLUMNS = ["hardware_label", "stack", "stack_versions", "device_memory_bytes", "run_dir"]  # joined from the run


def run_rows(run: Path) -> list[dict[str, Any]] | None:
    """One run dir's records with its environment joined in (RUN_COLUMNS); None (and a warning) if missing."""
    file = results_file(run)
    if not file.exists():
        warnings.warn(f"{file}: no such run (pass a run dir holding results.jsonl); skipped", stacklevel=3)
        return None
    check_schema(file)
    records = read_records(file)
    env = read_environment(file) if records else {}
    joined = {"stack": stack_name(env), "stack_versions": stack_versions(env), "run_dir": str(file.parent)}
    for record in records:
        record["hardware_id"] = record["hardware_id"] or env.get("hardware_id", "unknown")
        record["hardware_label"] = env.get("hardware_label") or record["hardware_id"]
        record["device_memory_bytes"] = device_memory(record["device"], env)
        record.update(joined)
    return records


def read_run(run: Path) -> pd.DataFrame | None:
    """One run dir as a frame with its environment joined in; None (and a warning) if missing."""
    rows = run_rows(run)
    return None if rows is None else pd.DataFrame(rows, columns=[*Record.field_names(), *RUN_COLUMNS])


def dedupe(frame: pd.DataFrame, within: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Keep the newest record of each combination on each hardware and stack (and each value of
    the `within` columns, e.g. a night); say what was dropped."""
    key_columns = [*KEY, *within]
    frame = frame.sort_values("finished_at", kind="stable")
    dup = frame.duplicated(key_columns, keep="last")
    notes = []
    for key, group in frame[frame.duplicated(key_columns, keep=False)].groupby(
        key_columns, sort=True, dropna=False
    ):  # lora_rank is NaN off training
        kept = group.iloc[-1]
        runs = ", ".join(group["run_id"].astype(str))
        notes.append(
            f"{'/'.join(map(str, key[:4]))} on {kept['hardware_label']} ran {len(group)} times ({runs}); "
            f"kept the newest, {kept['run_id']} (finished {kept['finished_at']})"
        )
    return frame[~dup].reset_index(drop=True), notes


def _hardware_names(frame: pd.DataFrame) -> pd.Series:
    """hardware_label, with the id appended where two hardware ids share a label, and the stack
    where the runs hold several, so every table keeps stacks apart."""
    ids_per_label = frame.groupby("hardware_label")["hardware_id"].transform("nunique")
    names = frame["hardware_label"].where(
        ids_per_label <= 1, frame["hardware_label"] + " [" + frame["hardware_id"] + "]"
    )
    return names + " · " + frame["stack"] if frame["stack"].nunique() > 1 else names


def _is_causal(frame: pd.DataFrame) -> pd.Series:
    return frame["model_kind"] == "causal-lm"


def add_derived(frame: pd.DataFrame) -> pd.DataFrame:
    """Quality loss, speed, memory, reference flags and every metric relative to the reference."""
    frame = frame.copy()
    causal, encoder = _is_causal(frame), frame["model_kind"] == "encoder"
    num = lambda c: pd.to_numeric(frame[c], errors="coerce")  # noqa: E731
    frame["hardware"] = _hardware_names(frame)
    frame["is_reference"] = frame["precision"] == frame["reference_precision"]
    frame["quality_loss"] = num("kl_mean").where(causal, (1 - num("embed_cosine_mean")).where(encoder))
    frame["quality_metric"] = pd.Series("kl_mean", index=frame.index).where(causal, "1-cosine").where(causal | encoder)
    frame["tolerance_loss"] = num("ppl_delta_frac").where(causal, (1 - num("embed_cosine_mean")).where(encoder))
    frame["speed"] = num("decode_tok_s").where(causal, num("encode_samples_s"))
    frame["speed_unit"] = pd.Series("decode tok/s", index=frame.index).where(causal, "encode seq/s")
    # the headline peak over every phase (records before it existed: device allocator, else host RSS)
    frame["memory_bytes"] = (
        num("peak_memory_bytes").fillna(num("peak_device_allocated_bytes")).fillna(num("peak_rss_bytes"))
    )
    frame["precision_rank"] = [precision_order(p) for p in frame["precision"]]
    frame["family"] = [family_of(p) for p in frame["precision"]]
    for metric in REL_METRICS:
        frame[f"{metric}_rel"] = num(metric) / _reference_values(frame, metric)
    return frame.sort_values(["model", "hardware", "device", "framework", "precision_rank", "precision"]).reset_index(
        drop=True
    )


def _reference_values(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Each row's reference value of `metric`: the row of its group whose precision is the reference."""
    ref = frame[frame["is_reference"] & (frame["status"] == "ok")].drop_duplicates(GROUP)
    ref = ref.set_index(GROUP)[metric].rename("_ref")
    merged = frame[GROUP].join(ref, on=GROUP)
    return pd.to_numeric(merged["_ref"], errors="coerce").set_axis(frame.index)


def load_frame(runs: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """The tidy, deduplicated frame of all `runs`, and notes on what merging dropped."""
    frames = [f for f in (read_run(run) for run in find_run_dirs(runs)) if f is not None]
    if not frames:
        raise UsageError(f"no run found in {', '.join(map(str, runs))}: run `harness run` first or pass a run dir")
    frame = pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)
    frame, notes = dedupe(frame)
    return add_derived(frame), notes


def export_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with list and dict columns as JSON strings, so CSV and Parquet round-trip."""
    out = frame.copy()
    for column in LIST_COLUMNS:
        if column in out:
            out[column] = [json.dumps(v) for v in out[column]]
    return out
