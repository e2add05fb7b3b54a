"""Benchmark: merging and reporting many nights (not a workflow step; numbers for the README/issue).

Synthesizes a history from one real run dir: NIGHTS nights x MACHINES hardware labels x STACKS
stack names, each a copy of the real records with run-to-run noise on the raw samples, then times
the report job's command on tonight's run dirs with that history:

    python ci/nightly/benchmark_history.py reports/<run> [--nights 30] [--machines 3] [--stacks 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLED = ("load_s", "prefill_tok_s", "decode_tok_s", "encode_samples_s")


def synthesize(source: Path, night_dir: Path, night: int, machines: int, stacks: int, seed: int) -> None:
    """One night: a run dir per machine x stack, records copied from `source` with +-3 % noise."""
    rng = np.random.default_rng(seed)
    records = [json.loads(line) for line in (source / "results.jsonl").read_text().splitlines() if line.strip()]
    env = json.loads((source / "environment.json").read_text())
    for machine in range(machines):
        label = f"machine-{machine + 1}"
        for stack in ("latest", "min", "nightly-torch", "pinned")[:stacks]:
            run_id = f"{label}-{stack}"
            out = night_dir / f"run-{run_id}"
            out.mkdir(parents=True)
            lines = []
            for record in records:
                record = dict(record, run_id=run_id, hardware_id=f"hw{machine:010d}", env_id=f"{run_id}"[:12])
                record["finished_at"] = f"2026-01-{night + 1:02d}T03:00:00+00:00"
                for metric in SAMPLED:
                    samples = record.get(f"{metric}_samples") or []
                    if samples:
                        noisy = (np.asarray(samples) * rng.uniform(0.97, 1.03, len(samples))).tolist()
                        record[f"{metric}_samples"], record[metric] = noisy, float(np.median(noisy))
                lines.append(json.dumps(record))
            (out / "results.jsonl").write_text("\n".join(lines) + "\n")
            night_env = env | {"hardware_id": f"hw{machine:010d}", "hardware_label": label, "stack": stack,
                               "started_at": f"2026-01-{night + 1:02d}T02:00:00+00:00"}  # fmt: skip
            (out / "environment.json").write_text(json.dumps(night_env))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a real run dir (results.jsonl + environment.json)")
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--machines", type=int, default=3)
    parser.add_argument("--stacks", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where to write (default: a temporary dir, removed after)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nightly-bench-"))
    try:
        start = time.perf_counter()
        for night in range(args.nights):
            synthesize(
                args.source,
                work / "history" / f"202601{night + 1:02d}-030000",
                night,
                args.machines,
                args.stacks,
                night,
            )
        synthesize(args.source, work / "tonight", args.nights, args.machines, args.stacks, 999)
        records = sum(1 for _ in (args.source / "results.jsonl").read_text().splitlines())
        print(f"synthesized {args.nights} nights + tonight x {args.machines} machines x {args.stacks} stacks "
              f"x {records} records in {time.perf_counter() - start:.1f} s")  # fmt: skip
        cmd = [sys.executable, "-m", "harness.cli", "report", str(work / "tonight"), "--history", str(work / "history"),
               "--out", str(work / "report"), "--format", "md,html,csv", "--fail-on-regression", "10"]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(f"harness report --history: exit {done.returncode}, {wall:.1f} s wall (imports included)")
        if done.returncode not in (0, 1):
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
