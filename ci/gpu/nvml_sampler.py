"""Sample NVML's list of processes holding a CUDA context, with each process's role, to a JSONL log.

    python3 ci/gpu/nvml_sampler.py --out LOG [--interval 0.2] [--device 0]

Runs until SIGTERM or SIGINT. One line per sample:
    {"t": unix time, "device": 0, "processes": [{"pid", "used_bytes", "ppid", "role", "cmd"}]}
The role is read from /proc at sampling time, so the log itself shows which kind of process held
a context:
- `worker`: a child forked by a multiprocessing forkserver (its command line is the forkserver's,
  its parent is the forkserver), or a spawned child (`multiprocessing.spawn`);
- `forkserver`: the forkserver itself; `resource-tracker`: multiprocessing's tracker;
- `other`: anything else, e.g. the harness or pytest parent; `gone`: exited before /proc was read.
The harness promises that only workers ever hold a CUDA context; ci/gpu/cudacheck.py checks this
log against it. The first line is a header ({"header": ...}) saying what was sampled, or why
nothing could be (no NVML, no GPU), in which case the sampler exits 0 at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

FORKSERVER_MARK = "multiprocessing.forkserver"
SPAWN_MARK = "multiprocessing.spawn"
TRACKER_MARK = "multiprocessing.resource_tracker"


def command_line(pid: int) -> str | None:
    """/proc/<pid>/cmdline as one string, or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def parent_pid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[1])  # the field after the state, past the (comm)


def process_role(pid: int) -> tuple[str, int | None, str]:
    """(role, parent pid, command line) of a process, read from /proc now."""
    cmd, ppid = command_line(pid), parent_pid(pid)
    if cmd is None or ppid is None:
        return "gone", None, ""
    if SPAWN_MARK in cmd:
        return "worker", ppid, cmd
    if TRACKER_MARK in cmd:
        return "resource-tracker", ppid, cmd
    if FORKSERVER_MARK in cmd:
        parent_cmd = command_line(ppid) or ""
        return ("worker" if FORKSERVER_MARK in parent_cmd else "forkserver"), ppid, cmd
    return "other", ppid, cmd


def sample(handle, device: int) -> dict:
    """One NVML reading of the compute processes on `device`, each with its role."""
    import pynvml

    processes = []
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        role, ppid, cmd = process_role(proc.pid)
        used = proc.usedGpuMemory if isinstance(proc.usedGpuMemory, int) else None
        processes.append({"pid": proc.pid, "used_bytes": used, "ppid": ppid, "role": role, "cmd": cmd[:160]})
    return {"t": round(time.time(), 3), "device": device, "processes": processes}


def run(out: Path, interval_s: float, device: int, stop: threading.Event) -> int:
    """Sample until `stop` is set; returns the number of samples written."""
    with open(out, "w", encoding="utf-8") as log:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
            name = pynvml.nvmlDeviceGetName(handle)
        except Exception as exc:  # no pynvml, no driver, no such device: say so and stop
            log.write(json.dumps({"header": {"error": f"{type(exc).__name__}: {exc}", "device": device}}) + "\n")
            return 0
        header = {"device": device, "name": str(name), "interval_s": interval_s, "sampler_pid": os.getpid()}
        log.write(json.dumps({"header": header}) + "\n")
        count = 0
        try:
            while not stop.is_set():
                log.write(json.dumps(sample(handle, device)) + "\n")
                log.flush()
                count += 1
                stop.wait(interval_s)
        finally:
            pynvml.nvmlShutdown()
        return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default 0.2)")
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    count = run(args.out, args.interval, args.device, stop)
    print(f"nvml_sampler: {count} samples in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
