"""Prefill, decode and encode speed (`pytest suites/ --benchmark`), one pytest-benchmark entry per
operation with the worker's synchronized samples."""

import pytest

from harness.checks import budget_problems, finite_problems


@pytest.mark.harness_benchmark
def test_prefill(harness_record, combo_benchmark):
    if harness_record["model_kind"] != "causal-lm":
        pytest.skip("encoders have no prefill: see test_encode")
    combo_benchmark("prefill")
    assert not finite_problems(harness_record, ("prefill_tok_s", "prefill_tok_s_iqr"))


@pytest.mark.harness_benchmark
def test_decode(harness_record, harness_session, combo_benchmark):
    if harness_record["model_kind"] != "causal-lm":
        pytest.skip("encoders do not decode")
    combo_benchmark("decode")
    problems = finite_problems(
        harness_record, ("decode_tok_s", "ttft_s", "token_latency_p50_s", "decode_roofline_frac")
    )
    problems += budget_problems(
        harness_record, harness_session.budgets_for(harness_record["model"]), ("min_decode_tok_s",)
    )
    assert not problems, problems


@pytest.mark.harness_benchmark
def test_encode(harness_record, combo_benchmark):
    if harness_record["model_kind"] != "encoder":
        pytest.skip("decoders: see test_prefill and test_decode")
    combo_benchmark("encode")
    assert not finite_problems(harness_record, ("encode_samples_s", "encode_samples_s_iqr"))
