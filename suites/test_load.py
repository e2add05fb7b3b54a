"""Load time and memory (`pytest suites/ --benchmark`). pytest-benchmark stores the worker's own
load_s samples; budgets come from the matrix file's [budgets] table."""

import pytest

from harness.checks import budget_problems, finite_problems

LOAD_FIELDS = ("load_s", "first_forward_s", "weight_bytes", "peak_rss_bytes", "peak_rss_anon_bytes", "rss_file_bytes")


@pytest.mark.harness_benchmark
def test_load(harness_record, harness_session, combo_benchmark):
    combo_benchmark("load")
    problems = finite_problems(harness_record, LOAD_FIELDS)
    problems += budget_problems(
        harness_record, harness_session.budgets_for(harness_record["model"]), ("max_load_s", "max_weight_bytes")
    )
    assert not problems, problems
