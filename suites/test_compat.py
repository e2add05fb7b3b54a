"""Compatibility: does each combination load, run, generate, survive a save/load round trip, and
agree with its reference precision? Runs by default (`pytest suites/`).

Agreement tolerances (harness.checks.DEFAULT_TOLERANCES) are per precision; override them in
the matrix file's [tolerances] table.
"""

from harness.checks import agreement_problems, roundtrip_problems


def test_loads(harness_record):
    assert harness_record["status"] == "ok"
    assert harness_record["weight_bytes"] > 0 and harness_record["load_s"] > 0


def test_forward_is_finite(harness_record):
    # The worker checks every output of the first forward with isfinite; a NaN fails the record.
    assert harness_record["first_forward_s"] > 0


def test_generates_the_requested_tokens(harness_record):
    if harness_record["model_kind"] != "causal-lm":
        return  # encoders do not generate
    # Greedy generation must return exactly greedy_tokens for each prompt or the worker fails.
    assert harness_record["greedy_match_frac"] is not None, harness_record["na_reasons"].get("greedy_match_frac")
    assert len(harness_record["greedy_first_diverge"]) > 0


def test_survives_a_save_load_round_trip(harness_record):
    problems = roundtrip_problems(harness_record)
    assert not problems, problems


def test_agrees_with_the_reference(harness_record, harness_session):
    problems = agreement_problems(harness_record, harness_session.tolerances_for(harness_record["model"]))
    assert not problems, problems
