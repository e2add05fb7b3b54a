"""Fixtures and per-session state of the pytest plugin.

HarnessSession lives in the pytest config's stash (no module globals). It turns the options and
the matrix file into a Plan, runs each combination once in an isolated worker the first time a
test asks for its record, and hands the same record to every later test of that combination.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.environment import Environment, collect_environment
from harness.plan.matrix import Capabilities, Combo, combo_id
from harness.records import METRICS, Record
from harness.run.runner import Plan, Runner, reference_first
from harness.storage import RunWriter

SESSION_KEY = pytest.StashKey["HarnessSession"]()


def display_name(model: str) -> str:
    """Test-id form of a model: a local directory by its name, a zoo name or hub id as is."""
    path = Path(model).expanduser()
    return path.name if model.startswith(("/", ".", "~")) or path.is_dir() else model


def param_id(combo: Combo) -> str:
    return combo_id(display_name(combo.model), combo.framework, combo.precision, combo.device)


def axis_markers(combo: Combo) -> list[str]:
    """One marker per axis value, plus the device kind (`cuda` for `cuda:1`)."""
    names = [display_name(combo.model), combo.framework, combo.precision, combo.device]
    kind = combo.device.partition(":")[0]
    return list(dict.fromkeys([*names, kind]))


def combo_param(combo: Combo) -> Any:
    return pytest.param(combo, id=param_id(combo), marks=[getattr(pytest.mark, m) for m in axis_markers(combo)])


class HarnessSession:
    """The matrix of one pytest session and the records measured so far."""

    def __init__(
        self,
        plan: Plan,
        combos: list[Combo],
        reports_dir: Path,
        run_id: str | None,
        env: Environment,
    ) -> None:
        self.plan = plan
        self.combos = combos
        self.reports_dir = reports_dir
        self.run_id = run_id
        self.env = env
        self.records: dict[tuple[Combo, str], Record] = {}
        self._runners: dict[str, Runner] = {}
        self._writer: RunWriter | None = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> HarnessSession:
        """The session from pytest's options: the suites' settings, under a --matrix file, under the flags."""
        env = collect_environment()
        capabilities = Capabilities.detect(env)
        benchmark = bool(config.getoption("--benchmark"))
        settings = {"repeats": 1, "roundtrip": True, "throughput": benchmark, "cold": benchmark}
        plan = Plan.from_flags(config.getoption, capabilities, settings)
        combos = reference_first(plan.combos(), plan.options, capabilities)
        reports_dir = config.getoption("--reports-dir") or Path(config.rootpath) / "reports"
        return cls(plan, combos, reports_dir, config.getoption("--run-id"), env)

    def marker_names(self) -> set[str]:
        return {name for combo in self.combos for name in axis_markers(combo)}

    def runner(self, scenario: str = "inference") -> Runner:
        """The scenario's runner, created on its first measurement (so collecting alone writes nothing);
        both scenarios write to the session's one run dir."""
        if scenario not in self._runners:
            if self._writer is None:
                self._writer = RunWriter(self.reports_dir, self.env, self.run_id)
            plan = replace(self.plan, options=replace(self.plan.options, scenario=scenario))
            self._runners[scenario] = Runner(plan, self._writer, self.env)
        return self._runners[scenario]

    @property
    def run_dir(self) -> Path | None:
        return self._writer.path if self._writer else None

    def record_for(self, combo: Combo, scenario: str = "inference") -> Record:
        """The combination's record in `scenario`, measured once per session (on disk before this returns)."""
        if (combo, scenario) not in self.records:
            self.records[(combo, scenario)] = self.runner(scenario).run_combo(combo)
        return self.records[(combo, scenario)]

    def budgets_for(self, model: str) -> dict[str, float]:
        return self.plan.matrix_file.budgets_for(model) if self.plan.matrix_file else {}

    def tolerances_for(self, model: str) -> dict[str, float]:
        return self.plan.matrix_file.tolerances_for(model) if self.plan.matrix_file else {}

    def finish(self, write_report: bool) -> None:
        if self.run_dir is None or not write_report:
            return
        from harness.report import write_report as report

        report([self.run_dir], out=self.run_dir / "report", formats=("md", "html"))


class ReplayClock:
    """A pytest-benchmark timer that replays durations the worker measured.

    pytest-benchmark reads the timer before and after each round's target; the target is
    `advance`, which moves this clock forward by the next measured duration. So the stored
    timings are exactly the worker's synchronized samples, not process or IPC overhead.
    """

    __name__ = "ReplayClock"

    def __init__(self) -> None:
        self.now = 0.0
        self._pending: list[float] = []

    def __call__(self) -> float:
        return self.now

    def load(self, durations: list[float]) -> None:
        self._pending = list(durations)

    def advance(self) -> None:
        self.now += self._pending.pop(0)


OPERATIONS: dict[str, tuple[str, str]] = {
    # operation: (record field with samples, how one sample becomes seconds per operation)
    "load": ("load_s_samples", "seconds"),
    "prefill": ("prefill_tok_s_samples", "tokens_per_second"),
    "decode": ("decode_tok_s_samples", "tokens_per_second"),
    "encode": ("encode_samples_s_samples", "sequences_per_second"),
    "train_step": ("train_step_s_samples", "seconds"),  # forward + backward + optimizer step
}
# pytest-benchmark extra_info: who, every declared metric (harness.records.METRICS), and its context
EXTRA_INFO_FIELDS = (
    "model", "framework", "precision", "family", "device", "scenario", "lora_method", "lora_rank", "env_id",
    "hardware_id",
    *METRICS,
    "peak_rss_anon_bytes", "rss_file_bytes", "decode_roofline_tok_s", "memory_bandwidth_bytes_s",
    "reference_precision", "reference_model", "storage_dtype", "compute_dtype", "contended",
)  # fmt: skip


def operation_seconds(record: dict[str, Any], operation: str) -> list[float]:
    """The worker's raw samples for one operation, as seconds per operation."""
    field, unit = OPERATIONS[operation]
    samples = record.get(field) or []
    if unit == "seconds":
        return list(samples)
    if operation == "prefill":
        work = record["prompt_length"] * record["batch_size"]
    elif operation == "decode":
        work = record["batch_size"]  # one decode step makes batch_size tokens
    else:
        work = record["batch_size"]
    return [work / rate for rate in samples]


def replay_benchmark(benchmark: Any, clock: ReplayClock, record: dict[str, Any], operation: str) -> None:
    """Store the worker's samples for `operation` in pytest-benchmark, with the metrics as extra_info."""
    seconds = operation_seconds(record, operation)
    if not seconds:
        pytest.skip(
            f"no {operation} samples: {record['na_reasons'].get(OPERATIONS[operation][0][:-8], 'not measured')}"
        )
    benchmark.group = operation
    benchmark.extra_info.update({k: record.get(k) for k in EXTRA_INFO_FIELDS})
    benchmark.extra_info["operation"] = operation
    clock.load(seconds)
    benchmark.pedantic(clock.advance, rounds=len(seconds), iterations=1, warmup_rounds=0)


@pytest.fixture(scope="session")
def harness_session(request: pytest.FixtureRequest) -> HarnessSession:
    session = request.config.stash.get(SESSION_KEY, None)
    if session is None:
        pytest.skip("the harness matrix is not set up in this session")
    return session


def _checked(record: Record) -> dict[str, Any]:
    """The record as a dict; skips with the matrix rule's reason, fails with the worker's error."""
    if record.status == "skipped":
        pytest.skip(record.skip_reason or "unsupported")
    if record.status == "failed":
        pytest.fail(f"{record.error_kind}: {record.error}", pytrace=False)
    return record.to_dict()


@pytest.fixture
def harness_record(harness_combo: Combo, harness_session: HarnessSession) -> dict[str, Any]:
    """The combination's inference record; skips with the matrix rule's reason, fails with the worker's error."""
    return _checked(harness_session.record_for(harness_combo))


@pytest.fixture
def finetune_record(harness_combo: Combo, harness_session: HarnessSession) -> dict[str, Any]:
    """The combination's finetune-scenario record (a training run in its own workers), like harness_record."""
    return _checked(harness_session.record_for(harness_combo, "finetune"))


def _replayer(request: pytest.FixtureRequest, benchmark: Any, record: dict[str, Any]) -> Any:
    marker = request.node.get_closest_marker("benchmark")
    clock = marker.kwargs.get("timer") if marker else None
    if not isinstance(clock, ReplayClock):
        raise RuntimeError("a harness benchmark fixture needs the ReplayClock the plugin attaches at collection")

    def run(operation: str) -> None:
        replay_benchmark(benchmark, clock, record, operation)

    return run


@pytest.fixture
def combo_benchmark(request: pytest.FixtureRequest, benchmark: Any, harness_record: dict[str, Any]):
    """`combo_benchmark("decode")` stores that operation's worker-measured samples in pytest-benchmark."""
    return _replayer(request, benchmark, harness_record)


@pytest.fixture
def finetune_benchmark(request: pytest.FixtureRequest, benchmark: Any, finetune_record: dict[str, Any]):
    """`finetune_benchmark("train_step")`: the training steps' worker-measured samples in pytest-benchmark."""
    return _replayer(request, benchmark, finetune_record)
