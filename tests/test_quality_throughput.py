"""Issue 3: throughput and quality against the reference, from the real zoo run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import by_precision
from harness.measure.quality import compare_causal, compare_encoder, spearman
from harness.zoo import ensure_built

THROUGHPUT_CAUSAL = ("prefill_tok_s", "decode_tok_s", "generate_tok_s", "ttft_s", "token_latency_p50_s")


def test_the_reference_against_itself_is_exact(zoo_run: list[dict[str, Any]]) -> None:
    for model in ("tiny-llama", "tiny-gpt2", "tiny-llama-trained"):
        ref = by_precision(zoo_run, model)["fp32"]
        assert ref["reference_precision"] == "fp32"
        assert ref["kl_mean"] == 0.0 and ref["kl_p99"] == 0.0 and ref["max_abs_logit_diff"] == 0.0
        assert ref["top1_agree"] == 1.0 and ref["greedy_match_frac"] == 1.0 and ref["ppl_delta_frac"] == 0.0
        assert ref["greedy_first_diverge"] == [None] * 4
    for model in ("tiny-bert", "minilm"):
        ref = by_precision(zoo_run, model)["fp32"]
        assert ref["embed_cosine_mean"] == pytest.approx(1.0, abs=1e-12) and ref["rank_agree"] == 1.0


def test_trained_model_kl_ranks_with_confidence_intervals(zoo_run: list[dict[str, Any]]) -> None:
    """Measured ranking on CPU: fp16 < bf16, and int8 and bf16 both clearly below nf4 <= fp4.

    (int8 lands below bf16 here: LLM.int8() multiplies in fp16 and keeps embeddings, norms and
    head in fp16, while bf16 rounds every activation to 8 mantissa bits.)
    """
    r = by_precision(zoo_run, "tiny-llama-trained")
    for precision in ("fp16", "bf16", "int8", "nf4", "nf4-dq", "fp4"):
        low, mid, high = (r[precision][k] for k in ("kl_mean_ci_low", "kl_mean", "kl_mean_ci_high"))
        assert 0 < low <= mid <= high, precision
    assert r["fp16"]["kl_mean_ci_high"] < r["bf16"]["kl_mean_ci_low"]
    for better in ("bf16", "int8"):
        assert r[better]["kl_mean_ci_high"] < r["nf4"]["kl_mean_ci_low"], better
        assert r[better]["kl_mean"] * 5 < r["nf4"]["kl_mean"], "nf4's KL must clearly exceed int8's"
    assert r["nf4"]["kl_mean"] <= r["fp4"]["kl_mean_ci_high"]
    assert r["nf4"]["top1_agree"] < r["int8"]["top1_agree"] <= 1.0


def test_trained_model_is_far_better_than_random(zoo_run: list[dict[str, Any]]) -> None:
    trained = by_precision(zoo_run, "tiny-llama-trained")["fp32"]["ppl"]
    random_model = by_precision(zoo_run, "tiny-llama")["fp32"]["ppl"]
    assert trained < random_model / 3
    assert trained < 1024 / 3  # a 1024-token vocab: uniform guessing gives 1024


def test_minilm_int8_keeps_its_embeddings(zoo_run: list[dict[str, Any]]) -> None:
    r = by_precision(zoo_run, "minilm")
    assert r["int8"]["embed_cosine_mean"] >= 0.99
    assert r["nf4"]["embed_cosine_mean"] < r["int8"]["embed_cosine_mean"]
    assert r["int8"]["rank_agree"] > 0.9


def test_fields_that_do_not_apply_are_null_with_a_reason(zoo_run: list[dict[str, Any]]) -> None:
    encoder = by_precision(zoo_run, "minilm")["int8"]
    for name in ("decode_tok_s", "ttft_s", "kl_mean", "ppl", "decode_roofline_frac"):
        assert encoder[name] is None and encoder["na_reasons"][name]
    causal = by_precision(zoo_run, "tiny-llama")["int8"]
    for name in ("encode_samples_s", "embed_cosine_mean", "rank_agree"):
        assert causal[name] is None and causal["na_reasons"][name]


def test_throughput_is_positive_and_keeps_its_samples(zoo_run: list[dict[str, Any]]) -> None:
    for record in zoo_run:
        if record["model_kind"] == "causal-lm":
            assert all(record[name] > 0 for name in THROUGHPUT_CAUSAL), record["precision"]
            assert record["new_tokens"] == 8 and record["prompt_length"] == 128 and record["batch_size"] == 1
            assert record["decode_tok_s"] == statistics.median(record["decode_tok_s_samples"])
            assert record["prefill_tok_s"] == statistics.median(record["prefill_tok_s_samples"])
            assert len(record["decode_tok_s_samples"]) >= 2
            assert record["token_latency_p50_s"] <= record["token_latency_p90_s"]
        else:
            assert record["encode_samples_s"] == statistics.median(record["encode_samples_s_samples"]) > 0


def test_roofline_fields_are_consistent(zoo_run: list[dict[str, Any]]) -> None:
    for record in zoo_run:
        bandwidth = record["memory_bandwidth_bytes_s"]
        assert bandwidth > 1e8
        assert record["decode_roofline_tok_s"] == pytest.approx(bandwidth / record["weight_bytes"])
        if record["model_kind"] == "causal-lm":
            assert 0 < record["decode_roofline_frac"] <= 1
            assert record["decode_roofline_frac"] == pytest.approx(
                record["decode_tok_s"] / record["decode_roofline_tok_s"]
            )


def test_decode_rate_and_ttft_follow_from_the_records_own_token_times(zoo_run: list[dict[str, Any]]) -> None:
    """Deterministic: the last timed repeat's token timestamps, kept in the record, give its decode
    sample ((N-1) x batch over the first-to-last-token span) and its TTFT (the first token's time)."""
    for record in zoo_run:
        if record["model_kind"] != "causal-lm":
            assert record["decode_token_times_s"] == [] and record["ttft_s_samples"] == []
            continue
        times, tokens, batch = record["decode_token_times_s"], record["new_tokens"], record["batch_size"]
        assert len(times) == tokens, record["precision"]
        assert 0 < times[0] and all(np.diff(times) > 0), "tokens land one after another"
        assert record["decode_tok_s_samples"][-1] == (tokens - 1) * batch / (times[-1] - times[0])
        assert record["ttft_s_samples"][-1] == times[0]
        assert len(record["ttft_s_samples"]) == len(record["decode_tok_s_samples"])
        assert record["ttft_s"] == statistics.median(record["ttft_s_samples"])


def test_comparison_metrics_on_hand_made_outputs() -> None:
    logits = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    chunks = np.random.default_rng(1).integers(0, 16, size=(1, 64))
    greedy = np.arange(8)[None, :]
    ref = {"logits": logits, "chunks": chunks, "greedy": greedy}
    shifted = {"logits": logits + 3.0, "chunks": chunks, "greedy": greedy}  # softmax is shift-invariant
    same = compare_causal(ref, shifted)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-12) and same["top1_agree"] == 1.0
    assert same["max_abs_logit_diff"] == pytest.approx(3.0)
    worse = compare_causal(ref, {"logits": logits * 0.5, "chunks": chunks, "greedy": greedy[:, ::-1]})
    assert worse["kl_mean"] > 0 and worse["greedy_first_diverge"] == [0] and worse["greedy_match_frac"] == 0
    emb = np.random.default_rng(2).normal(size=(10, 4))
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    assert compare_encoder({"embeddings": emb, "pairs": pairs}, {"embeddings": 2 * emb})["rank_agree"] == 1.0
    assert spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1)
    assert math.isclose(
        compare_encoder({"embeddings": emb, "pairs": pairs}, {"embeddings": emb})["embed_cosine_min"], 1
    )


def test_every_precision_compares_the_reference_tokens_unless_far_slower(tmp_path: Path) -> None:
    """The reference decides the token count once for its model and device (from its own forward rate);
    a precision 3x slower compares the same tokens (it used to compare 3x fewer), one more than
    QUALITY_OVERRUN_FACTOR x slower compares fewer and says so (eval_tokens < reference_eval_tokens)."""
    from harness.backends.base import LoadSpec
    from harness.backends.pytorch import PyTorchBackend
    from harness.measure.quality import QUALITY_OVERRUN_FACTOR, causal_quality, eval_token_ids, quality_budget_s
    from harness.options import RunOptions

    source = str(ensure_built("tiny-llama-trained"))
    options = RunOptions(eval_tokens=2048, greedy_prompts=1, greedy_tokens=2)
    ids = eval_token_ids(source, options)
    per_s = 2 / quality_budget_s(options)  # a forward rate of per_s x N tok/s affords N tokens in the budget
    reference_path = str(tmp_path / "reference.npz")
    fp32 = PyTorchBackend(LoadSpec(source, "causal-lm", "fp32", "cpu"))
    fp32.load()
    reference = causal_quality(fp32, ids, options, reference_path, reference_path, per_s * 1536)
    assert reference["eval_tokens"] == reference["reference_eval_tokens"] == 1536 < len(ids)
    nf4 = PyTorchBackend(LoadSpec(source, "causal-lm", "nf4", "cpu"))
    nf4.load()
    slower = causal_quality(nf4, ids, options, reference_path, None, per_s * 512)
    assert slower["eval_tokens"] == slower["reference_eval_tokens"] == 1536
    far_slower = causal_quality(nf4, ids, options, reference_path, None, per_s * 1024 / QUALITY_OVERRUN_FACTOR)
    assert (far_slower["eval_tokens"], far_slower["reference_eval_tokens"]) == (1024, 1536)
