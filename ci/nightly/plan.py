"""Workflow step (plan job): the bench matrix, runner label × stack × shard, from ci/hardware.toml.

Writes `matrix` (JSON for `strategy.matrix`) and `night` (the history dir name of this night)
to $GITHUB_OUTPUT, or prints them when that is unset.

    NIGHTLY_HARDWARE  hardware file (default ci/hardware.toml)
    NIGHTLY_RUNNERS   comma list of hardware labels (default: every enabled one)
    NIGHTLY_MATRIX    matrix file for every label (default: the label's, else [defaults])
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def fail(message: str) -> None:
    print(f"plan: error: {message}", file=sys.stderr)
    sys.exit(2)


def bench_matrix(hardware: dict[str, Any], runners: list[str], matrix_override: str | None) -> list[dict[str, Any]]:
    """One entry per label × stack × shard, in file order."""
    defaults = hardware.get("defaults", {})
    machines = hardware.get("hardware", {})
    unknown = [r for r in runners if r not in machines]
    if unknown:
        fail(f"unknown hardware label(s) {', '.join(unknown)}: use one of {', '.join(machines)}")
    chosen = runners or [label for label, m in machines.items() if m.get("enabled", True)]
    entries = []
    for label in chosen:
        machine = machines[label]
        runs_on = machine.get("runs-on")
        if not runs_on:
            fail(f"[hardware.{label}] needs runs-on, the runner labels of such a machine")
        shards = int(machine.get("shards", 1))
        matrix = matrix_override or machine.get("matrix") or defaults.get("matrix", "ci/nightly/matrix.toml")
        if not Path(matrix).is_file():
            fail(f"[hardware.{label}] matrix file {matrix} does not exist")
        for stack in machine.get("stacks", defaults.get("stacks", ["latest"])):
            for index in range(1, shards + 1):
                entries.append({
                    "label": label,
                    "runner": [runs_on] if isinstance(runs_on, str) else list(runs_on),
                    "stack": stack,
                    "shard": f"{index}/{shards}",
                    "matrix": matrix,
                    "run-id": f"{label}-{stack}-{index}of{shards}",
                    "pip-index-variable": str(machine.get("pip-index-variable", "")),
                })  # fmt: skip
    if not entries:
        fail("no hardware label is enabled: set enabled = true in the hardware file or name runners")
    return entries


def main() -> int:
    path = Path(os.environ.get("NIGHTLY_HARDWARE") or "ci/hardware.toml")
    try:
        hardware = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        fail(f"{path}: {exc}")
    runners = [r.strip() for r in os.environ.get("NIGHTLY_RUNNERS", "").split(",") if r.strip()]
    entries = bench_matrix(hardware, runners, os.environ.get("NIGHTLY_MATRIX") or None)
    run = os.environ.get("GITHUB_RUN_ID")
    night = datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + (f"-{run}" if run else "")
    outputs = {"matrix": json.dumps({"include": entries}), "night": night}
    target = os.environ.get("GITHUB_OUTPUT")
    text = "".join(f"{k}={v}\n" for k, v in outputs.items())
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
