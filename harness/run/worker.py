"""The code that runs inside one isolated worker process: load, measure, send back fields.

Anything that goes wrong in here becomes a message with an error kind; the parent turns a
worker that never answers (timeout, signal) into a failure record itself.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from harness.errors import one_line
from harness.options import RunOptions
from harness.plan.matrix import Combo
from harness.plan.models import ModelSource
from harness.registry import FRAMEWORKS
from harness.units import MIB

COLD_FIELDS = ("load_cold_s", "page_cache_resident_frac_before", "raw_read_bytes_s", "load_cold_bandwidth_frac")
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")


@dataclass(frozen=True)
class WorkerJob:
    """Everything one worker needs; sent to the child by pickling."""

    combo: Combo
    model: ModelSource
    options: RunOptions
    mode: str = "full"  # full: every measurement; load: load timing only; cold: a load after dropping the
    # checkpoint's pages (with a raw cold read beside it); bandwidth: device copy; plan: memory plan;
    # finetune: a training run (harness.measure.finetune); adapter: the trained adapter reloaded on a fresh base
    reference_path: str | None = None  # quality: the reference outputs to compare with
    write_reference_path: str | None = None  # quality: write this worker's outputs as the reference
    reference_note: str = ""  # why there is no reference, when there is none
    memory_bandwidth_bytes_s: float | None = None
    log_path: str | None = None
    fast_bf16: bool = False  # plan mode: does the device run bf16 natively (decides quantized storage dtypes)
    plan_precisions: tuple[str, ...] = ()  # plan mode: the precisions to plan besides the defaults
    adapter_dir: str | None = None  # finetune/adapter modes: where the adapter and the trained logits go


def classify(exc: BaseException) -> str:
    """oom for allocation failures on any device, else error."""
    if isinstance(exc, MemoryError):
        return "oom"
    if any(type(exc).__name__ in framework.oom_exceptions for framework in FRAMEWORKS.values()):
        return "oom"
    text = str(exc).lower()
    return "oom" if any(marker in text for marker in OOM_MARKERS) else "error"


# glibc's malloc raises its mmap threshold as large blocks are freed, so a quantizer's freed
# temporaries (one checkpoint tensor each) stay in the heap: anonymous RSS 0.9-2.2x the checkpoint
# above what the load needs, bimodal between runs (measured, harness/plan/memplan.py). A fixed 1 MiB
# threshold returns large blocks to the OS when freed, so peaks measure the model, not the allocator.
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def _fixed_mmap_threshold() -> None:
    """mallopt(M_MMAP_THRESHOLD, 1 MiB) in this worker (the same as MALLOC_MMAP_THRESHOLD_=1048576); a
    no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name and "musl" not in name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _redirect_output(log_path: str | None) -> None:
    if not log_path:
        return
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run_job(job: WorkerJob, on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load and measure one combination; returns record fields. `on_phase(name)` hears each phase
    the finetune scenario enters (the memory watchdog names it when it ends the worker)."""
    from harness.backends import LoadSpec, backend_for
    from harness.measure.inference import measure_load

    spec = LoadSpec(
        source=job.model.source,
        kind=job.model.kind or "causal-lm",
        precision=job.combo.precision,
        device=job.combo.device,
        allow_pickle=job.options.allow_pickle,
        trust_remote_code=job.options.trust_remote_code,
        tokenizer=job.model.tokenizer,
    )
    if job.mode == "plan":
        from harness.plan.preflight import plan_fields

        return plan_fields(job)
    if job.mode == "bandwidth":
        return {"memory_bandwidth_bytes_s": backend_for(job.combo.framework, spec).memory_bandwidth_bytes_s()}
    from harness.measure.quality import model_eval_ids

    eval_ids, tokenizer_note = model_eval_ids(job.model, job.options)
    backend = backend_for(job.combo.framework, spec)
    if job.options.memory_limit_bytes:
        backend.limit_device_memory(job.options.memory_limit_bytes)
    if job.mode in ("finetune", "adapter"):
        from harness.measure.finetune import adapter_fields, finetune_fields

        if job.mode == "adapter":
            return adapter_fields(backend, job)
        return finetune_fields(backend, job, eval_ids, on_phase) | {"worker_pid": os.getpid()}
    if job.mode == "cold":
        return cold_load_fields(backend, spec.kind, eval_ids)
    fields = measure_load(backend, spec.kind, eval_ids)
    fields["worker_pid"] = os.getpid()
    if job.mode == "full":
        from harness.measure.inference import measure_after_load

        after = measure_after_load(backend, job, eval_ids, fields, tokenizer_note)
        after["na_reasons"] = {**fields.pop("na_reasons", {}), **after.get("na_reasons", {})}
        fields.update(after)
        reasons = fields["na_reasons"]
        for name in COLD_FIELDS:
            fields.setdefault(name, None)
            reasons.setdefault(name, "no cold load in this run (--no-cold, or the worker failed)")
        fields.setdefault("load_s_ci_rel", None)
        reasons.setdefault("load_s_ci_rel", "the runner computes it over the load repeats")
    fields.pop("_phases", None)
    return fields


def drop_weight_pages(backend: Any) -> tuple[int, float, float]:
    """After prepare(): a raw cold read of the files the backend's load reads (harness.measure.inference.loaded_files:
    the GGUF file for llama.cpp), then their pages dropped. Returns (bytes read, read seconds,
    resident fraction of those files after the drop)."""
    from harness.measure.inference import loaded_files
    from harness.measure.pagecache import cold_read_bytes_s, drop_cached_pages, resident_fraction

    files = loaded_files(backend)
    read_bytes, read_s = cold_read_bytes_s(files)
    drop_cached_pages(files)
    return read_bytes, read_s, resident_fraction(files)


def cold_load_fields(backend: Any, kind: str, eval_ids: Any) -> dict[str, Any]:
    """A cold load: after prepare(), a raw cold read of the weight files, drop their pages, check residency, load.

    Returns load_cold_s, page_cache_resident_frac_before (measure_load's residency right before the
    load clock), raw_read_bytes_s, load_cold_bandwidth_frac.
    """
    from harness.measure.inference import measure_load

    dropped: list[tuple[int, float, float]] = []
    fields = measure_load(backend, kind, eval_ids, before_load=lambda: dropped.append(drop_weight_pages(backend)))
    fields.pop("_phases")
    read_bytes, read_s, _ = dropped[0]
    raw_rate = read_bytes / read_s if read_s > 0 else None
    load_cold_s = fields["load_s"]
    checkpoint = fields.get("checkpoint_bytes")
    return {
        "load_cold_s": load_cold_s,
        "page_cache_resident_frac_before": fields["page_cache_resident_frac_before_load"],
        "raw_read_bytes_s": raw_rate,
        "load_cold_bandwidth_frac": checkpoint / load_cold_s / raw_rate if checkpoint and raw_rate else None,
    }


def _send(conn: Connection, message: dict[str, Any], started_at: float) -> None:
    message["started_at"] = started_at
    try:
        conn.send(message)
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()


def worker_main(job: WorkerJob, conn: Connection) -> None:
    """Entry point of a worker process."""
    started_at = time.time()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash should end fast, not dump GBs
    _fixed_mmap_threshold()
    _redirect_output(job.log_path)
    faulthandler.enable()  # a fatal signal (SIGSEGV, SIGABRT, ...) leaves every thread's Python stack in the log
    _quiet_libraries()
    watchdog = None
    if job.options.memory_limit_bytes:
        from harness.measure.trackers import MemoryWatchdog

        def breach(rss: int, ceiling: int, phase: str) -> None:
            error = (
                f"resident memory {rss / MIB:.0f} MiB passed --memory-limit "
                f"({ceiling / MIB:.0f} MiB = baseline + {job.options.memory_limit_bytes / MIB:.0f} MiB)"
                + (f" in the {phase} phase" if phase != "start" else "")
            )
            print(f"harness: {error}", file=sys.stderr)
            _send(conn, {"ok": False, "error_kind": "oom", "error": error}, started_at)
            os._exit(3)

        watchdog = MemoryWatchdog(job.options.memory_limit_bytes, breach).start()
    try:
        fields = run_job(job, watchdog.enter_phase if watchdog is not None else None)
        message: dict[str, Any] = {"ok": True, "fields": fields}
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        message = {"ok": False, "error_kind": classify(exc), "error": one_line(exc)}
    if watchdog is not None:
        watchdog.stop()
    _send(conn, message, started_at)
