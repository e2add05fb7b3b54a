"""The pytest plugin (entry point `pytest11: harness`): options, parametrization, markers, hooks.

`pytest suites/` runs the quick compatibility checks; `pytest suites/ --benchmark` adds the
measurement suites. Every test of one combination shares one isolated worker (see
harness.plugin.fixtures.HarnessSession); records are written to the run dir as each combination finishes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.options import add_run_options, add_selection_options
from harness.plugin.fixtures import (  # noqa: F401 - the fixtures are registered by being here
    SESSION_KEY,
    HarnessSession,
    ReplayClock,
    combo_benchmark,
    combo_param,
    finetune_benchmark,
    finetune_record,
    harness_record,
    harness_session,
)

BENCHMARK_MARK = "harness_benchmark"
FINETUNE_MARK = "finetune"  # the finetune scenario's suite (suites/test_finetune.py)
REPLAY_FIXTURES = ("combo_benchmark", "finetune_benchmark")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "harness",
        "harness: model load/speed/quality matrix. The run options are `harness run`'s (one declaration,"
        " harness.options); the suites run --repeats 1 with --roundtrip, and time prefill/decode and the cold"
        " load only with --benchmark",
    )
    group.addoption("--benchmark", action="store_true", help="run the measurement suites, not only compat")
    add_selection_options(group.addoption)
    group.addoption("--reports-dir", type=Path, help="where run dirs go (default: <rootdir>/reports)")
    add_run_options(group.addoption, pytest=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{BENCHMARK_MARK}: a measurement suite test, run only with --benchmark")
    config.addinivalue_line(
        "markers", f"{FINETUNE_MARK}: a fine-tuning suite test, run with -m finetune or --scenario finetune"
    )
    if config.getoption("--benchmark") and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError(
            "--benchmark cannot run under pytest-xdist (-n): pytest-benchmark disables itself there; drop -n"
        )
    if not _uses_harness(config):
        return
    try:
        session = HarnessSession.from_config(config)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    _apply_shard(config, session)
    config.stash[SESSION_KEY] = session
    for marker in session.marker_names():
        config.addinivalue_line("markers", f"{marker}: harness matrix axis value")


def _apply_shard(config: pytest.Config, session: HarnessSession) -> None:
    """--shard I/N keeps that shard's combinations (the same split as `harness run --shard`)."""
    spec = config.getoption("--shard")
    if spec:
        from harness.plan.shard import select_shard

        try:
            session.combos = select_shard(session.combos, session.plan.models, session.plan.options, spec)
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None


def _uses_harness(config: pytest.Config) -> bool:
    """Set the session up only when a suite will be collected, so `pytest tests/` stays light."""
    args = [str(a) for a in config.args]
    return any("suites" in Path(a).parts or Path(a).name.startswith("suites") for a in args) or bool(
        config.getoption("--matrix")
        or config.getoption("--models")
        or config.getoption("--benchmark")
        or config.getoption("--shard")
        or config.getoption("--scenario")
    )


def _wants_finetune(config: pytest.Config) -> bool:
    """The fine-tuning suite runs when asked for: --scenario finetune, or a -m expression naming it."""
    return config.getoption("--scenario") == "finetune" or FINETUNE_MARK in (config.getoption("markexpr") or "")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "harness_combo" not in metafunc.fixturenames:
        return
    session: HarnessSession | None = metafunc.config.stash.get(SESSION_KEY, None)
    if session is None:
        session = HarnessSession.from_config(metafunc.config)
        _apply_shard(metafunc.config, session)
        metafunc.config.stash[SESSION_KEY] = session
    metafunc.parametrize("harness_combo", [combo_param(c) for c in session.combos], scope="function")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Attach a replay clock to timed tests; mark what a known upstream break fails as a strict
    xfail (harness.known_issues); without --benchmark, deselect the measurement suites; the
    fine-tuning suite only when asked for (and then only it, with --scenario finetune)."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in REPLAY_FIXTURES):
            item.add_marker(pytest.mark.benchmark(timer=ReplayClock()))
        _mark_known_issue(config, item)
    benchmark, finetune = config.getoption("--benchmark"), _wants_finetune(config)
    only_finetune = config.getoption("--scenario") == "finetune"
    keep, drop = [], []
    for item in items:
        is_finetune = item.get_closest_marker(FINETUNE_MARK) is not None
        dropped = (
            (not benchmark and item.get_closest_marker(BENCHMARK_MARK) is not None)
            or (is_finetune and not finetune)
            or (only_finetune and not is_finetune)
        )
        (drop if dropped else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _mark_known_issue(config: pytest.Config, item: pytest.Item) -> None:
    """A suite test that an active known issue fails, for this combination: xfail(strict=True), so it
    is expected to fail with an assertion while the break lasts, and fails the run once it is fixed."""
    combo = getattr(getattr(item, "callspec", None), "params", {}).get("harness_combo")
    session: HarnessSession | None = config.stash.get(SESSION_KEY, None)
    if combo is None or session is None:
        return
    from harness.known_issues import suite_issue

    model = session.plan.models.get(combo.model)
    issue = suite_issue(
        getattr(item, "originalname", item.name), combo.framework, combo.precision, combo.device,
        model.kind if model else None,
    )  # fmt: skip
    if issue is not None:
        item.add_marker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=issue.xfail_reason()))


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add GPUs, libraries and the harness fingerprint to pytest-benchmark's machine_info."""
    from harness.environment import collect_environment

    env = collect_environment().to_dict()
    machine_info["harness"] = {
        key: env[key]
        for key in ("env_id", "hardware_id", "hardware_label", "gpus", "nvidia_driver", "cuda_driver_version")
    }
    machine_info["harness"]["libraries"] = env["libraries"]
    machine_info["harness"]["cpu_flags"] = env["cpu_flags"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    harness: HarnessSession | None = session.config.stash.get(SESSION_KEY, None)
    if harness is not None:
        harness.finish(write_report=bool(session.config.getoption("--benchmark")))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    harness: HarnessSession | None = config.stash.get(SESSION_KEY, None)
    if harness is None or not harness.records:
        return
    from harness.report.printers import summary_table

    terminalreporter.section("harness")
    terminalreporter.write_line(summary_table(r.to_dict() for r in harness.records.values()))
    terminalreporter.write_line(f"run dir: {harness.run_dir}")
