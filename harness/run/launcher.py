"""Launchers: run a WorkerJob in a fresh, isolated process under a timeout.

Each framework's registry entry says how its workers start. PyTorch workers fork from a
forkserver that has already imported torch and transformers (and, on machines without a GPU,
the selected precisions' quantizer packages, whose imports may probe CUDA), so each combination
gets a fresh process without paying the imports again. The forkserver never touches CUDA.
Spawned frameworks (TensorFlow) start a clean interpreter per worker and never share a process
with PyTorch.
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

from harness.registry import FRAMEWORKS
from harness.run.worker import WorkerJob, worker_main

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
    statement = FRAMEWORKS[framework].import_statement
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


class Launcher:
    """Starts one worker per job and turns every way a worker can end into a WorkerResult."""

    def __init__(self, extra_preload: dict[str, tuple[str, ...]] | None = None) -> None:
        """`extra_preload`: per framework, modules its forkserver imports beyond the registry's preload."""
        self._contexts: dict[str, BaseContext] = {}
        self._extra_preload = extra_preload or {}

    def _context(self, framework: str) -> BaseContext:
        if framework not in self._contexts:
            descriptor = FRAMEWORKS[framework]
            context = multiprocessing.get_context(descriptor.start_method)
            if descriptor.start_method == "forkserver":
                context.set_forkserver_preload([*descriptor.preload, *self._extra_preload.get(framework, ())])
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
