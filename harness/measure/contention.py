"""Contention: how much CPU other processes took while a phase was timed (after pyperf's system checks).

Per phase: the machine's busy CPU time (/proc/stat: user+nice+system+irq+softirq+steal, all CPUs)
minus this process's own CPU time (/proc/self/stat utime+stime+cutime+cstime, every thread),
against the phase's capacity (wall x usable cores). A phase is contended when others took more
than CONTENDED_SHARE of that capacity, after allowing for the clock-tick rounding of /proc
(TICK_ALLOWANCE ticks per CPU per phase). Steal time counts as others: a hypervisor's other guests.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONTENDED_SHARE = 0.10  # others used > 10 % of the machine's core-seconds during a timed phase
TICK_ALLOWANCE = 2  # /proc counts whole clock ticks: allow this many per CPU (+ own) before judging
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0))


def machine_cpus() -> int:
    """CPUs /proc/stat accounts for (the whole machine, beyond this process's affinity)."""
    return sum(1 for line in Path("/proc/stat").read_text().splitlines() if line[:3] == "cpu" and line[3:4].isdigit())


@dataclass(frozen=True)
class CpuSnapshot:
    """Clocks at one instant: wall, the machine's busy CPU, this process's CPU (seconds)."""

    wall_s: float
    machine_busy_s: float
    own_cpu_s: float

    @classmethod
    def now(cls) -> CpuSnapshot:
        tick = os.sysconf("SC_CLK_TCK")
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(first[i]) for i in _BUSY_COLUMNS if i < len(first))
        stat = Path("/proc/self/stat").read_text()
        own = stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd on; utime is the 14th
        own_ticks = sum(int(own[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        return cls(time.perf_counter(), busy / tick, own_ticks / tick)


@dataclass(frozen=True)
class PhaseLoad:
    """What the machine did while one phase ran."""

    phase: str
    wall_s: float
    own_cpu_s: float  # this process, all threads
    others_cpu_s: float  # every other process on the machine
    others_share: float  # others_cpu_s / (wall_s x machine CPUs), after the tick allowance
    load_avg_1m: float  # at the phase's end

    @property
    def contended(self) -> bool:
        return self.others_share > CONTENDED_SHARE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def phase_load(phase: str, start: CpuSnapshot, end: CpuSnapshot) -> PhaseLoad:
    """The machine's load between two snapshots."""
    cpus = machine_cpus()
    wall = max(end.wall_s - start.wall_s, 1e-9)
    own = end.own_cpu_s - start.own_cpu_s
    others = max(end.machine_busy_s - start.machine_busy_s - own, 0.0)
    allowance = TICK_ALLOWANCE * (cpus + 1) / os.sysconf("SC_CLK_TCK")
    share = max(others - allowance, 0.0) / (wall * cpus)
    return PhaseLoad(phase, wall, own, others, share, os.getloadavg()[0])


class ContentionMonitor:
    """Context manager: `with ContentionMonitor("decode") as monitor: ...`, then `monitor.result`."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.result: PhaseLoad | None = None

    def __enter__(self) -> ContentionMonitor:
        self._start = CpuSnapshot.now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.result = phase_load(self.phase, self._start, CpuSnapshot.now())


def contention_fields(phases: list[PhaseLoad], intra_op_threads: int | None) -> dict[str, Any]:
    """Record fields: contended, a one-line account with the numbers, and the per-phase detail."""
    cores = usable_cores()
    worst = max(phases, key=lambda p: p.others_share, default=None)
    contended = any(p.contended for p in phases)
    parts = []
    if worst is not None:
        verdict = "contended" if contended else "quiet"
        parts.append(
            f"{verdict}: others used {worst.others_share:.0%} of the machine's CPU during {worst.phase} "
            f"({worst.others_cpu_s:.2f} core-s in {worst.wall_s:.2f} s; threshold {CONTENDED_SHARE:.0%}), "
            f"load average {max(p.load_avg_1m for p in phases):.2f}"
        )
    if intra_op_threads is not None:
        parts.append(f"{intra_op_threads} intra-op threads on {cores} usable cores")
        if intra_op_threads > cores:
            parts.append("oversubscribed")
    return {
        "contended": contended,
        "contention": "; ".join(parts) or None,
        "others_cpu_share_max": worst.others_share if worst else None,
        "load_avg_1m_max": max(p.load_avg_1m for p in phases) if phases else None,
        "intra_op_threads": intra_op_threads,
        "usable_cores": cores,
        "contention_phases": [p.to_dict() for p in phases],
    }
