"""Launchers: run a WorkerJob in a fresh, isolated process under a timeout.

PyTorch workers fork from a forkserver that has already imported torch and transformers (and
bitsandbytes on machines without a GPU, since its import probes CUDA), so each combination gets
a fresh process without paying the imports again. The forkserver never touches CUDA. Other
frameworks use spawn, so TensorFlow and PyTorch never share a process.
"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from harness.worker import WorkerJob, worker_main

PYTORCH_PRELOAD = ["harness.worker", "harness.measure", "harness.backends.pytorch"]
IMPORT_STATEMENTS = {
    "pytorch": "import torch, transformers",
    "tensorflow": "import tensorflow, keras, keras_hub",
}
CGROUP_EVENTS = Path("/sys/fs/cgroup/memory.events")


@dataclass
class WorkerResult:
    """What came back from one worker, or why nothing did."""

    ok: bool
    fields: dict[str, Any] = field(default_factory=dict)
    error_kind: str | None = None
    error: str | None = None
    wall_s: float = 0.0
    start_s: float | None = None


def _oom_kills() -> int:
    """The cgroup's count of processes killed by the kernel OOM killer (0 where unreadable)."""
    try:
        for line in CGROUP_EVENTS.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def measure_import_s(framework: str) -> float | None:
    """Seconds to import the framework stack in a fresh interpreter (one sample)."""
    statement = IMPORT_STATEMENTS.get(framework)
    if statement is None:
        return None
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


class Launcher:
    """Starts one worker per job and turns every way a worker can end into a WorkerResult."""

    def __init__(self, preload_bitsandbytes: bool) -> None:
        self._contexts: dict[str, BaseContext] = {}
        self._preload = PYTORCH_PRELOAD + (["bitsandbytes"] if preload_bitsandbytes else [])

    def _context(self, framework: str) -> BaseContext:
        if framework not in self._contexts:
            if framework == "pytorch":
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(self._preload)
            else:
                context = multiprocessing.get_context("spawn")
            self._contexts[framework] = context
        return self._contexts[framework]

    def run(self, job: WorkerJob, timeout_s: float) -> WorkerResult:
        context = self._context(job.combo.framework)
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=worker_main, args=(job, sender), daemon=True)
        oom_kills_before = _oom_kills()
        start = time.time()
        process.start()
        sender.close()
        message = None
        try:
            # Wait for a message or the worker's exit, whichever comes first. (The pipe alone is
            # not enough: the forkserver may hold a copy of its write end, so no EOF on a crash.)
            ready = wait([receiver, process.sentinel], timeout_s)
            if receiver.poll(0):
                message = receiver.recv()
        except (EOFError, OSError):
            message = None
        finally:
            receiver.close()
        timed_out = not ready
        if timed_out:
            process.kill()
        process.join(timeout=30)
        wall_s = time.time() - start
        if message is not None:
            start_s = message["started_at"] - start
            if message["ok"]:
                return WorkerResult(True, message["fields"], wall_s=wall_s, start_s=start_s)
            return WorkerResult(False, error_kind=message["error_kind"], error=message["error"], wall_s=wall_s)
        if timed_out:
            return WorkerResult(
                False,
                error_kind="timeout",
                error=f"no result within {timeout_s:g} s: raise --timeout or choose a smaller model",
                wall_s=wall_s,
            )
        code = process.exitcode
        if code is not None and code < 0:
            name = _signal_name(-code)
            if -code == signal.SIGKILL and _oom_kills() > oom_kills_before:
                return WorkerResult(
                    False, error_kind="oom", error="killed by the kernel OOM killer (SIGKILL)", wall_s=wall_s
                )
            return WorkerResult(False, error_kind="crash", error=f"worker died by {name}", wall_s=wall_s)
        return WorkerResult(
            False, error_kind="crash", error=f"worker exited with code {code} and no result", wall_s=wall_s
        )
