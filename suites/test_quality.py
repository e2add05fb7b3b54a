"""Quality against the reference precision (`pytest suites/ --benchmark`): every metric present and
finite (or null with a reason), and within the matrix file's max_kl_mean budget."""

import pytest

from harness.checks import budget_problems, finite_problems

CAUSAL = ("kl_mean", "kl_mean_ci_low", "kl_mean_ci_high", "kl_p99", "top1_agree", "ppl", "ppl_delta_frac")
ENCODER = ("embed_cosine_mean", "embed_cosine_min", "rank_agree")


@pytest.mark.harness_benchmark
def test_quality(harness_record, harness_session):
    fields = CAUSAL if harness_record["model_kind"] == "causal-lm" else ENCODER
    problems = finite_problems(harness_record, fields)
    problems += budget_problems(harness_record, harness_session.budgets_for(harness_record["model"]), ("max_kl_mean",))
    assert not problems, problems
