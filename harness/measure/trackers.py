"""Trackers: context managers that measure one span of work in the worker process.

Host memory comes from the kernel: VmHWM (reset through /proc/self/clear_refs) is the exact peak
RSS; RssAnon/RssFile/RssShmem give the split, sampled on a thread for the anonymous peak.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.nvml import nvml_session

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory lines of /proc/<pid>/status, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class HostMemory:
    """Host memory over one span."""

    before_bytes: int = 0
    peak_rss_bytes: int = 0  # kernel high-water mark
    sampled_peak_rss_bytes: int = 0  # max of the samples (a cross-check: <= peak_rss_bytes)
    peak_rss_anon_bytes: int = 0
    after: dict[str, int] | None = None
    hwm_reset: bool = False  # VmHWM was reset at the start (else peak_rss_bytes is sampled only)


class HostMemoryTracker:
    """Samples RssAnon every `interval_s` and reads the kernel's peak at exit.

    VmHWM is reset on entry by writing 5 to /proc/self/clear_refs (Linux >= 4.0; checked on this
    project's kernels). Where the reset is refused, `hwm_reset` is False and the peak is the
    sampled one only (VmHWM would still hold an earlier phase's peak).
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.result = HostMemory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            status = proc_status()
            self.result.peak_rss_anon_bytes = max(self.result.peak_rss_anon_bytes, status["RssAnon"])
            self.result.sampled_peak_rss_bytes = max(self.result.sampled_peak_rss_bytes, status["VmRSS"])
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> HostMemoryTracker:
        self.result.hwm_reset = reset_peak_rss()
        self.result.before_bytes = proc_status()["VmRSS"]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        status = proc_status()
        self.result.peak_rss_anon_bytes = max(self.result.peak_rss_anon_bytes, status["RssAnon"])
        hwm = status["VmHWM"] if self.result.hwm_reset else 0
        self.result.peak_rss_bytes = max(hwm, self.result.sampled_peak_rss_bytes, status["VmRSS"])
        self.result.after = status


@dataclass
class PhaseResult:
    """One phase of a worker: host memory, the device allocator's peak, and the machine's load."""

    name: str
    host: HostMemory
    device_peak_bytes: int | None = None  # allocator peak over the phase (CUDA/TF GPU), None on the host
    device_reserved_peak_bytes: int | None = None  # the allocator's reserved pool at its largest (PyTorch CUDA)
    load: Any = None  # harness.measure.contention.PhaseLoad, for timed phases


class PhaseMeter:
    """Context manager over one named phase: resets and reads the RSS high-water mark, the device
    allocator's peak (through `backend`), and, for timed phases, the CPU others took meanwhile.

    Timed phases sample RssAnon every 20 ms (the sampler holds the GIL briefly; VmHWM is exact anyway).
    """

    def __init__(self, name: str, backend: Any = None, timed: bool = False) -> None:
        from harness.measure.contention import ContentionMonitor

        self.backend = backend
        self.memory = HostMemoryTracker(interval_s=0.02 if timed else 0.005)
        self.monitor = ContentionMonitor(name) if timed else None
        self.result = PhaseResult(name, self.memory.result)

    def __enter__(self) -> PhaseMeter:
        reset = getattr(self.backend, "reset_device_peaks", None)
        if reset is not None:
            reset()
        self.memory.__enter__()
        if self.monitor is not None:
            self.monitor.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.monitor is not None:
            self.monitor.__exit__(*exc)
            self.result.load = self.monitor.result
        self.memory.__exit__(*exc)
        device_memory = getattr(self.backend, "device_memory", None)
        if device_memory is not None:
            memory = device_memory()
            self.result.device_peak_bytes = memory.get("peak_device_allocated_bytes")
            self.result.device_reserved_peak_bytes = memory.get("peak_device_reserved_bytes")


class Timer:
    """Wall time of a span, with the device synchronized before each clock read."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.elapsed_s = 0.0

    def __enter__(self) -> Timer:
        self.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.synchronize()
        self.elapsed_s = time.perf_counter() - self._start


def copy_bandwidth_bytes_s(
    copy: Callable[[], None], synchronize: Callable[[], None], size_bytes: int, repeats: int = 5
) -> float:
    """Median rate of `repeats` synchronized calls of `copy`, which moves `size_bytes` (read + written)."""
    copy()  # warm-up: page in both buffers
    rates = []
    for _ in range(repeats):
        with Timer(synchronize) as timer:
            copy()
        rates.append(2 * size_bytes / timer.elapsed_s)
    return statistics.median(rates)


def own_pids() -> set[int]:
    """This process's pid in every pid namespace /proc shows (NSpid), so NVML's host pids can match."""
    pids = {os.getpid()}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                pids |= {int(p) for p in line.split()[1:]}
    except OSError:
        pass
    return pids


def nvml_process_bytes(device_index: int, pids: set[int] | None = None) -> int | None:
    """GPU memory NVML attributes to this process on one device; None where NVML is absent or
    lists none of this process's pids (never 0 for "not found": see harness.records.NVML_NO_PID_REASON)."""
    with nvml_session() as nvml:
        if nvml is None:
            return None
        pids = pids or own_pids()
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            used = [p.usedGpuMemory for p in processes if p.pid in pids and p.usedGpuMemory is not None]
            return int(sum(used)) if used else None
        except nvml.NVMLError:
            return None


class MemoryWatchdog:
    """Ends the worker as `oom` once its resident memory exceeds a budget above its baseline.

    RSS polling, not RLIMIT_AS: CUDA and allocators reserve huge address ranges that are never
    resident, so an address-space limit would fail every CUDA combination. The breach callback
    runs on the polling thread and must end the process.
    """

    def __init__(self, limit_bytes: int, on_breach: Callable[[int, int, str], None], interval_s: float = 0.002) -> None:
        self.limit_bytes = limit_bytes
        self.phase = "start"  # what the worker is doing (set through enter_phase): the breach names it
        self.baseline_bytes = proc_status()["VmRSS"]
        self.on_breach = on_breach
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @property
    def ceiling_bytes(self) -> int:
        return self.baseline_bytes + self.limit_bytes

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = proc_status()["VmRSS"]
            if rss > self.ceiling_bytes:
                self.on_breach(rss, self.ceiling_bytes, self.phase)
                return

    def enter_phase(self, name: str) -> None:
        self.phase = name

    def start(self) -> MemoryWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
