"""Issue 2: every failure kind, produced for real, with the run going on and earlier records kept."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from conftest import remote_code_checkpoint, run_matrix

BEHAVIOURS = {
    "raises": 'raise RuntimeError("weights disagree with the config")',
    "sleeps": "time.sleep(120)",
    "sigkill": "os.kill(os.getpid(), signal.SIGKILL)",
    "segfault": "ctypes.string_at(0)",
}


def test_every_failure_kind_becomes_a_record_and_the_run_goes_on(tmp_path: Path) -> None:
    models = ["tiny-llama"]
    for name, behaviour in BEHAVIOURS.items():
        models.append(str(remote_code_checkpoint(tmp_path / "models", name, behaviour)))
    models.append("tiny-gpt2")
    started = time.monotonic()
    records = run_matrix(
        tmp_path / "reports", tuple(models), ("fp32",), repeats=1, timeout_s=20.0,
        trust_remote_code=True, throughput=False, quality=False,
    )  # fmt: skip
    assert time.monotonic() - started < 120, "the sleeping worker must be cut off by the timeout"
    outcome = [(r["status"], r["error_kind"]) for r in records]
    assert outcome == [
        ("ok", None),
        ("failed", "error"),
        ("failed", "timeout"),
        ("failed", "crash"),
        ("failed", "crash"),
        ("ok", None),
    ]
    errors = [r["error"] for r in records]
    assert errors[1] == "RuntimeError: weights disagree with the config"
    assert "no result within 20 s" in errors[2]
    assert errors[3] == f"worker died by {signal.SIGKILL.name}"
    assert errors[4] == f"worker died by {signal.SIGSEGV.name}"
    for error in errors[1:5]:
        assert "\n" not in error
    # Each record was on disk, in order, before the next combination started.
    lines = (tmp_path / "reports" / "run" / "results.jsonl").read_text().splitlines()
    stamps = [json.loads(line)["finished_at"] for line in lines]
    assert stamps == sorted(stamps) and len(lines) == 6


def test_a_worker_past_its_memory_limit_is_an_oom_record(tmp_path: Path) -> None:
    records = run_matrix(
        tmp_path, ("tiny-llama", "tiny-gpt2"), ("fp32",), repeats=1, memory_limit_bytes=4 << 20,
        throughput=False, quality=False,
    )  # fmt: skip
    assert [(r["status"], r["error_kind"]) for r in records] == [("failed", "oom"), ("failed", "oom")]
    assert all("\n" not in r["error"] for r in records)
