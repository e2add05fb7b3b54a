"""Issue 4: the pytest plugin, driven through pytester on copies of the real suites."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SUITES = Path(__file__).resolve().parent.parent / "suites"
CPU_PYTORCH = ["--devices", "cpu", "--frameworks", "pytorch"]


@pytest.fixture
def suites(pytester: pytest.Pytester) -> Path:
    """A copy of suites/ in a fresh directory, as a user's checkout would have it."""
    target = pytester.path / "suites"
    shutil.copytree(SUITES, target)
    return target


def test_no_suite_module_shares_a_name_with_a_test_module() -> None:
    """pytest imports test modules by basename (rootdir-less, as pytester's in-process runs are): a
    suites/ file named like a tests/ file fails to collect once the tests/ one is imported."""
    tests = {p.name for p in Path(__file__).resolve().parent.glob("test_*.py")}
    assert not tests & {p.name for p in SUITES.glob("test_*.py")}


def collected_ids(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if "::" in line]


def test_options_parametrize_readable_stable_ids(pytester: pytest.Pytester, suites: Path) -> None:
    result = pytester.runpytest(
        str(suites / "test_compat.py"), "--collect-only", "-q", "--models", "tiny-llama,minilm",
        "--precisions", "fp32,nf4", *CPU_PYTORCH,
    )  # fmt: skip
    ids = collected_ids(result)
    assert "suites/test_compat.py::test_loads[tiny-llama-pytorch-fp32-cpu]" in ids
    assert "suites/test_compat.py::test_agrees_with_the_reference[minilm-pytorch-nf4-cpu]" in ids
    assert len(ids) == 5 * 4


def test_markers_select_axis_values(pytester: pytest.Pytester, suites: Path) -> None:
    result = pytester.runpytest(
        str(suites / "test_compat.py"), "--collect-only", "-q", "--models", "tiny-llama",
        "--precisions", "fp32,nf4,nf4-dq,fp4", *CPU_PYTORCH, "-m", "cpu and not fp4 and not nf4-dq",
    )  # fmt: skip
    ids = collected_ids(result)
    assert ids and all(("-fp32-" in i or "-nf4-cpu" in i) for i in ids)
    assert len(ids) == 5 * 2
    by_k = collected_ids(pytester.runpytest(str(suites), "--collect-only", "-q", "--models", "tiny-llama", *CPU_PYTORCH, "-k", "nf4-dq and loads"))  # fmt: skip
    assert by_k == ["suites/test_compat.py::test_loads[tiny-llama-pytorch-nf4-dq-cpu]"]


def test_measurement_suites_run_only_with_benchmark(pytester: pytest.Pytester, suites: Path) -> None:
    args = [str(suites), "--collect-only", "-q", "--models", "tiny-llama", "--precisions", "fp32", *CPU_PYTORCH]
    plain = collected_ids(pytester.runpytest(*args))
    assert plain and all("test_compat.py" in i for i in plain)
    with_benchmark = collected_ids(pytester.runpytest(*args, "--benchmark"))
    assert {Path(i.split("::")[0]).name for i in with_benchmark} == {
        "test_compat.py", "test_load.py", "test_throughput.py", "test_quality.py",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('precisions = ["fp32"]\ncolour = "blue"\n', "unknown key 'colour'"),
        ('precisions = "fp32"\n', "precisions must be a non-empty list of strings"),
        ('precisions = ["int3"]\n', "unknown precision 'int3'"),
        ("[options]\nrepeat = 3\n", "unknown key 'repeat' in [options]"),
        ("[options]\nrepeats = 0\n", "--repeats must be positive"),
        ('[options]\nprompt_lengths = ["long"]\n', "prompt_lengths must be a list of integers"),
        ("[budgets]\nmax_load = 1\n", "unknown key 'max_load' in [budgets]"),
        ("[budgets]\nmax_load_s = -1\n", "max_load_s must be a non-negative number"),
        ("[models.tiny-llama]\nprecision = []\n", "unknown key 'precision' in [models.tiny-llama]"),
        ("models = [\n", "not valid TOML"),
    ],
)
def test_matrix_file_errors_are_one_clear_line(
    pytester: pytest.Pytester, suites: Path, content: str, message: str
) -> None:
    matrix = pytester.path / "matrix.toml"
    matrix.write_text(content)
    result = pytester.runpytest(str(suites), "--collect-only", "--matrix", str(matrix))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1 and message in errors[0], result.errlines
    assert "Traceback" not in "\n".join(result.errlines)


def test_matrix_file_declares_axes_and_per_model_overrides(pytester: pytest.Pytester, suites: Path) -> None:
    matrix = pytester.path / "matrix.toml"
    matrix.write_text(
        'frameworks = ["pytorch"]\ndevices = ["cpu"]\nprecisions = ["fp32", "int8", "nf4"]\n'
        '[models.tiny-llama]\nprecisions = ["fp32", "nf4"]\n[models.minilm]\n'
    )
    ids = collected_ids(
        pytester.runpytest(str(suites / "test_compat.py"), "--collect-only", "-q", "--matrix", str(matrix))
    )
    combos = {i.split("[")[1].rstrip("]") for i in ids}
    assert combos == {
        "tiny-llama-pytorch-fp32-cpu", "tiny-llama-pytorch-nf4-cpu",
        "minilm-pytorch-fp32-cpu", "minilm-pytorch-int8-cpu", "minilm-pytorch-nf4-cpu",
    }  # fmt: skip


def test_unsupported_combinations_skip_with_the_rule_reason(pytester: pytest.Pytester, suites: Path) -> None:
    result = pytester.runpytest(
        str(suites / "test_compat.py"), "-rs", "--models", "tiny-llama", "--precisions", "fp32",
        "--devices", "xla", "--frameworks", "pytorch",
    )  # fmt: skip
    result.assert_outcomes(skipped=5)
    result.stdout.fnmatch_lines(["*SKIPPED*xla devices need torch_xla*"])


def test_budget_breach_fails_and_extra_info_is_stored(pytester: pytest.Pytester, suites: Path) -> None:
    """A real --benchmark run of one combination: budgets, pytest-benchmark JSON, run dir, one worker."""
    matrix = pytester.path / "matrix.toml"
    matrix.write_text(
        "[options]\nnew_tokens = 8\ntiming_repeats = 3\nmin_timing_s = 0.0\neval_tokens = 512\n"
        "[budgets]\nmax_load_s = 0.000001\nmin_decode_tok_s = 1.0\n"
    )
    out = pytester.path / "out.json"
    result = pytester.runpytest_subprocess(
        str(suites), "--benchmark", "--matrix", str(matrix), "--models", "tiny-llama", "--precisions", "fp32",
        *CPU_PYTORCH, "-p", "no:cacheprovider", "--benchmark-json", str(out), "--run-id", "budget",
    )  # fmt: skip
    result.assert_outcomes(passed=7, failed=1, skipped=2)  # agreement skips: tiny-llama has random weights
    result.stdout.fnmatch_lines(["*load_s = * breaks budget max_load_s = 1e-06*"])
    data = json.loads(out.read_text())
    benchmarks = {b["group"]: b for b in data["benchmarks"]}
    assert set(benchmarks) == {"load", "prefill", "decode"}
    decode = benchmarks["decode"]
    assert decode["extra_info"]["model"] == "tiny-llama" and decode["extra_info"]["weight_bytes"] > 0
    assert {"kl_mean", "peak_rss_bytes", "decode_roofline_frac", "env_id"} <= set(decode["extra_info"])
    assert decode["options"]["timer"] == "ReplayClock" and decode["stats"]["rounds"] >= 3
    run_dir = pytester.path / "reports" / "budget"
    records = [json.loads(line) for line in (run_dir / "results.jsonl").open()]
    assert len(records) == 1, "one worker per combination across all suites"
    # pytest-benchmark's stats are the worker's own samples, replayed
    decode_s = sorted(records[0]["batch_size"] / r for r in records[0]["decode_tok_s_samples"])
    assert decode["stats"]["min"] == pytest.approx(decode_s[0]) and decode["stats"]["max"] == pytest.approx(
        decode_s[-1]
    )
    assert "harness" in data["machine_info"] and "libraries" in data["machine_info"]["harness"]
    assert (run_dir / "environment.json").exists() and (run_dir / "report" / "report.md").exists()
    result.stdout.fnmatch_lines(["*harness*", "| combination | status*", "run dir: *budget"])


READY_PLUGIN = """
import os

from harness.storage import RunWriter

_append = RunWriter.append


def _append_then_signal(self, record):
    _append(self, record)  # the record is fsynced when this returns
    os.write(int(os.environ["HARNESS_TEST_READY_FD"]), b"r")


RunWriter.append = _append_then_signal
"""


def test_interrupt_keeps_finished_records(tmp_path: Path) -> None:
    """Ctrl-C right after the second record is on disk: no polling, the child says when over a pipe."""
    shutil.copytree(SUITES, tmp_path / "suites")
    (tmp_path / "harness_ready_signal.py").write_text(READY_PLUGIN)
    command = [
        sys.executable, "-m", "pytest", "suites/test_compat.py", "-q", "-x", "--models", "tiny-llama,tiny-gpt2,tiny-bert",
        "--precisions", "fp32,bf16,fp16", *CPU_PYTORCH, "--run-id", "interrupted", "-p", "no:randomly",
        "-p", "harness_ready_signal",
    ]  # fmt: skip
    read_end, write_end = os.pipe()
    env = os.environ | {"HARNESS_TEST_READY_FD": str(write_end),
                        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    log = tmp_path / "child.log"
    with open(log, "wb") as output, os.fdopen(read_end, "rb", buffering=0) as ready:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, env=env, pass_fds=(write_end,),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job inherits SIGINT ignored
        )  # fmt: skip
        os.close(write_end)  # the child holds the only write end: its exit is an EOF here
        try:
            for _ in range(2):
                readable, _, _ = select.select([ready], [], [], 300)
                assert readable and ready.read(1) == b"r", log.read_text()[-2000:]
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == pytest.ExitCode.INTERRUPTED, log.read_text()[-2000:]
    lines = (tmp_path / "reports" / "interrupted" / "results.jsonl").read_text().splitlines()
    assert 2 <= len(lines) < 9
    assert all(json.loads(line)["status"] == "ok" for line in lines)


def test_xdist_with_benchmark_is_a_clear_error(pytester: pytest.Pytester, suites: Path) -> None:
    pytest.importorskip("xdist")
    result = pytester.runpytest(str(suites), "--benchmark", "-n", "2", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert any("cannot run under pytest-xdist" in line for line in result.errlines)
