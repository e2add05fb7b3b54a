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


class HostMemoryTracker:
    """Samples RssAnon every `interval_s` and reads the kernel's peak at exit."""

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
        reset_peak_rss()
        self.result.before_bytes = proc_status()["VmRSS"]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        status = proc_status()
        self.result.peak_rss_anon_bytes = max(self.result.peak_rss_anon_bytes, status["RssAnon"])
        self.result.peak_rss_bytes = max(status["VmHWM"], self.result.sampled_peak_rss_bytes)
        self.result.after = status


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


def nvml_process_bytes(device_index: int, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to this process on one device; None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    pid = pid or os.getpid()
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = [p.usedGpuMemory for p in processes if p.pid == pid and p.usedGpuMemory is not None]
        return int(sum(used)) if used else 0
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
