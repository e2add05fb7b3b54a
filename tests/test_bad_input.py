"""Issue 2: bad input gets one line that names the fix (exit 2), or a failure record; never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.zoo import ensure_built

FAST_RUN = [
    "--frameworks",
    "pytorch",
    "--repeats",
    "1",
    "--no-throughput",
    "--no-quality",
    "--no-cold",
    "--devices",
    "cpu",
    "--precisions",
    "fp32",
]


def harness(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "harness.cli", "run", *FAST_RUN, "--out", str(out), "--no-report", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def assert_usage_error(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def copy_model(tmp_path: Path, name: str = "tiny-llama") -> Path:
    target = tmp_path / f"copy-of-{name}"
    shutil.copytree(ensure_built(name), target)
    return target


@pytest.mark.parametrize(
    ("args", "phrases"),
    [
        (["--precisions", "int3"], ["unknown precision 'int3'", "fp32"]),
        (["--devices", "gpu"], ["unknown device 'gpu'", "cuda:N"]),
        (["--frameworks", "mxnet"], ["unknown framework 'mxnet'", "pytorch"]),
        (["--models", "tiny-lama"], ["unknown model 'tiny-lama'", "tiny-llama"]),
        (["--models", "./no/such/dir"], ["does not exist"]),
        (["--prompt-lengths", "12x"], ["--prompt-lengths takes integers"]),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], phrases: list[str]) -> None:
    # later flags win in argparse, so these override FAST_RUN's defaults
    assert_usage_error(harness(*args, out=tmp_path), *phrases)


def test_directory_without_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(harness("--models", str(empty), out=tmp_path), "no config.json")


def test_pickle_checkpoint_is_refused_unless_allowed(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    model = copy_model(tmp_path)
    weights = load_file(model / "model.safetensors")
    torch.save(weights, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    assert_usage_error(harness("--models", str(model), out=tmp_path), "pickle", "--allow-pickle")
    allowed = harness("--models", str(model), "--allow-pickle", out=tmp_path / "allowed")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    record = json.loads((tmp_path / "allowed" / "latest" / "results.jsonl").read_text())
    assert record["status"] == "ok"


def test_remote_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    model = copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "not-in-transformers", "auto_map": {"AutoConfig": "x.Y"}}
    (model / "config.json").write_text(json.dumps(config))
    assert_usage_error(harness("--models", str(model), out=tmp_path), "--trust-remote-code")


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [("truncate", "is truncated"), ("garble", "is corrupted")],
)
def test_damaged_safetensors_become_failure_records(tmp_path: Path, damage: str, phrase: str) -> None:
    model = copy_model(tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    result = harness("--models", f"{model},tiny-gpt2", out=tmp_path / "reports")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    records = [json.loads(line) for line in (tmp_path / "reports" / "latest" / "results.jsonl").open()]
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert records[0]["error_kind"] == "error"
    assert phrase in records[0]["error"] and "re-save or re-download" in records[0]["error"]
