"""The code that runs inside one isolated worker process: load, measure, send back fields.

Anything that goes wrong in here becomes a message with an error kind; the parent turns a
worker that never answers (timeout, signal) into a failure record itself.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from harness.config import RunOptions
from harness.errors import one_line
from harness.matrix import Combo
from harness.models import ModelSource

OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")


@dataclass(frozen=True)
class WorkerJob:
    """Everything one worker needs; sent to the child by pickling."""

    combo: Combo
    model: ModelSource
    options: RunOptions
    mode: str = "full"  # full: every measurement; load: load timing only; bandwidth: device copy; plan: memory plan
    reference_path: str | None = None  # quality: the reference outputs to compare with
    write_reference_path: str | None = None  # quality: write this worker's outputs as the reference
    reference_note: str = ""  # why there is no reference, when there is none
    memory_bandwidth_bytes_s: float | None = None
    log_path: str | None = None
    fast_bf16: bool = False  # plan mode: does the device run bf16 natively (decides quantized storage dtypes)
    plan_precisions: tuple[str, ...] = ()  # plan mode: the precisions to plan besides the defaults


def classify(exc: BaseException) -> str:
    """oom for allocation failures on any device, else error."""
    if isinstance(exc, MemoryError):
        return "oom"
    if type(exc).__name__ in ("OutOfMemoryError", "ResourceExhaustedError"):
        return "oom"
    text = str(exc).lower()
    return "oom" if any(marker in text for marker in OOM_MARKERS) else "error"


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


def run_job(job: WorkerJob) -> dict[str, Any]:
    """Load and measure one combination; returns record fields."""
    from harness.backends import LoadSpec, backend_for
    from harness.measure import measure_load

    spec = LoadSpec(
        source=job.model.source,
        kind=job.model.kind or "causal-lm",
        precision=job.combo.precision,
        device=job.combo.device,
        allow_pickle=job.options.allow_pickle,
        trust_remote_code=job.options.trust_remote_code,
    )
    if job.mode == "plan":
        from harness.preflight import plan_fields

        return plan_fields(job)
    if job.mode == "bandwidth":
        return {"memory_bandwidth_bytes_s": backend_for(job.combo.framework, spec).memory_bandwidth_bytes_s()}
    from harness.quality import model_eval_ids

    eval_ids, tokenizer_note = model_eval_ids(job.model, job.options)
    backend = backend_for(job.combo.framework, spec)
    if job.options.memory_limit_bytes:
        backend.limit_device_memory(job.options.memory_limit_bytes)
    fields = measure_load(backend, spec.kind, eval_ids)
    fields["worker_pid"] = os.getpid()
    if job.mode == "full":
        from harness.measure import measure_after_load

        fields.update(measure_after_load(backend, job, eval_ids, fields, tokenizer_note))
    return fields


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
    _redirect_output(job.log_path)
    _quiet_libraries()
    watchdog = None
    if job.options.memory_limit_bytes:
        from harness.trackers import MemoryWatchdog

        def breach(rss: int, ceiling: int) -> None:
            error = (
                f"resident memory {rss / 2**20:.0f} MiB passed --memory-limit "
                f"({ceiling / 2**20:.0f} MiB = baseline + {job.options.memory_limit_bytes / 2**20:.0f} MiB)"
            )
            print(f"harness: {error}", file=sys.stderr)
            _send(conn, {"ok": False, "error_kind": "oom", "error": error}, started_at)
            os._exit(3)

        watchdog = MemoryWatchdog(job.options.memory_limit_bytes, breach).start()
    try:
        fields = run_job(job)
        message: dict[str, Any] = {"ok": True, "fields": fields}
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        message = {"ok": False, "error_kind": classify(exc), "error": one_line(exc)}
    if watchdog is not None:
        watchdog.stop()
    _send(conn, message, started_at)
