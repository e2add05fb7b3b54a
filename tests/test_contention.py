"""Issue 14: contention is detected from /proc, not guessed from speed.

The machine is shared: other people's processes may be busy during any test, so no assertion here
needs a quiet machine. The burner test only adds load (burners can only raise others' share). The
own-work test compares this process's monitor with a witness: an idle process that monitors the
same interval from outside, so this process's CPU time is "others" to it. Whatever the background
does, the two see the same machine; the difference between their "others" must be this process's
own CPU time (the mistake it guards against would count this process's busy threads as others and
flag every fast benchmark as contended).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness.measure.contention import ContentionMonitor, contention_fields, machine_cpus

REPO = Path(__file__).resolve().parents[1]


def spin(seconds: float, clock=time.perf_counter) -> None:
    """Keep this process busy on its own threads (numpy matmuls use every core they may) until
    `clock` (wall by default; time.process_time: this process's CPU time) has advanced `seconds`."""
    a = np.random.default_rng(0).standard_normal((512, 512))
    end = clock() + seconds
    while clock() < end:
        a = np.tanh(a @ a)


def test_cpu_burners_beside_a_measurement_mark_it_contended() -> None:
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(machine_cpus())]
    try:
        time.sleep(0.3)  # let them reach the CPUs
        with ContentionMonitor("decode") as monitor:
            spin(1.5)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert monitor.result is not None
    assert monitor.result.contended, monitor.result
    fields = contention_fields([monitor.result], intra_op_threads=2)
    assert fields["contended"] is True and "contended: others used" in fields["contention"]


# An idle process that monitors from "ready" until a line arrives on stdin, then prints what it saw.
WITNESS = """
import json, sys
from harness.measure.contention import ContentionMonitor
with ContentionMonitor("witness") as monitor:
    print("ready", flush=True)
    sys.stdin.readline()
print(json.dumps(monitor.result.to_dict()), flush=True)
"""


def test_own_work_is_never_counted_as_others_on_a_busy_machine() -> None:
    witness = subprocess.Popen(
        [sys.executable, "-c", WITNESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert witness.stdout.readline().strip() == "ready"
        with ContentionMonitor("prefill") as monitor:
            spin(1.0, time.process_time)  # CPU seconds, however little of the machine others leave
        witness.stdin.write("done\n")
        witness.stdin.flush()
        seen = json.loads(witness.stdout.readline())
    finally:
        witness.kill()
        witness.wait()
    own = monitor.result
    assert own.own_cpu_s > 0.9  # this process's threads did the work ...
    assert seen["own_cpu_s"] < 0.05  # ... and the witness idled
    # /proc counts whole clock ticks per CPU: allow a few on each side, plus what the gaps could hold
    gaps_s = seen["wall_s"] - own.wall_s  # the witness's time outside this monitor
    ticks = 4 * (machine_cpus() + 1) / os.sysconf("SC_CLK_TCK")
    difference = seen["others_cpu_s"] - own.others_cpu_s
    assert own.own_cpu_s - ticks <= difference <= own.own_cpu_s + ticks + gaps_s * machine_cpus(), (seen, own)
