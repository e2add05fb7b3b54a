"""Issue 2: every failure kind, produced for real, with the run going on and earlier records kept."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from conftest import remote_code_checkpoint, run_matrix

TIMEOUT_S = 20.0


def behaviours(pid_file: Path) -> dict[str, str]:
    """Checkpoint code for each failure; the sleeper writes its pid first, so the test can see it was ended."""
    return {
        "raises": 'raise RuntimeError("weights disagree with the config")',
        "sleeps": f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)",
        "sigkill": "os.kill(os.getpid(), signal.SIGKILL)",
        "segfault": "ctypes.string_at(0)",
    }


def process_ended(pid: int) -> bool:
    """No such process, or only its zombie is left."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def test_every_failure_kind_becomes_a_record_and_the_run_goes_on(tmp_path: Path) -> None:
    models = ["tiny-llama"]
    pid_file = tmp_path / "sleeper.pid"
    for name, behaviour in behaviours(pid_file).items():
        models.append(str(remote_code_checkpoint(tmp_path / "models", name, behaviour)))
    models.append("tiny-gpt2")
    records = run_matrix(
        tmp_path / "reports", tuple(models), ("fp32",), repeats=1, timeout_s=TIMEOUT_S,
        trust_remote_code=True, throughput=False, quality=False,
    )  # fmt: skip
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
    assert f"no result within {TIMEOUT_S:g} s" in errors[2]
    assert errors[3] == f"worker died by {signal.SIGKILL.name}"
    assert errors[4] == f"worker died by {signal.SIGSEGV.name}"
    for error in errors[1:5]:
        assert "\n" not in error
    # The sleeper was cut off, not waited for: the parent waited the whole timeout, then ended it.
    assert records[2]["worker_wall_s"] >= TIMEOUT_S
    assert process_ended(int(pid_file.read_text()))
    # Each record was on disk, in order, before the next combination started.
    lines = (tmp_path / "reports" / "run" / "results.jsonl").read_text().splitlines()
    stamps = [json.loads(line)["finished_at"] for line in lines]
    assert stamps == sorted(stamps) and len(lines) == 6


def test_a_crashed_worker_leaves_its_python_stack_in_its_log(tmp_path: Path) -> None:
    model = remote_code_checkpoint(tmp_path / "models", "segfault", behaviours(tmp_path / "unused")["segfault"])
    (record,) = run_matrix(tmp_path / "reports", (str(model),), ("fp32",), repeats=1, trust_remote_code=True,
                           throughput=False, quality=False)  # fmt: skip
    assert record["error"] == f"worker died by {signal.SIGSEGV.name}"
    (log,) = [p for p in (tmp_path / "reports" / "run" / "logs").glob("*segfault*.log") if "-plan" not in p.name]
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text and "fault.py" in text  # where it crashed
