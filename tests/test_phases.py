"""Issue 14: peak memory for every phase, through the real runner and an isolated worker.

A small Llama with Llama 3's 128k vocabulary makes the quality pass's logits chunk (256 tokens x
128,256 x 4 bytes = 131 MB fp32, before the float64 comparison blocks) far larger than its weights
(~66 MB), so the quality phase's anonymous peak must stand above the load phase's by at least that
chunk: a record whose peak covered only load + first forward (the old behaviour) fails here.
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_matrix
from harness.measure.inference import PHASES
from harness.records import TRAIN_PHASES
from harness.workload import CHUNK_TOKENS
from harness.zoo.archs import build_large_vocab_llama


def test_every_phase_has_a_peak_and_the_headline_is_their_maximum(tmp_path: Path) -> None:
    model = build_large_vocab_llama(tmp_path / "large-vocab")
    records = run_matrix(tmp_path / "out", (str(model),), ("fp32",), repeats=1, timing_repeats=3, min_timing_s=0.0,
                         new_tokens=4, eval_tokens=512, greedy_prompts=1, greedy_tokens=4)  # fmt: skip
    (record,) = records
    assert record["status"] == "ok", record.get("error")
    peaks = {}
    for phase in PHASES:
        name = f"peak_rss_{phase}_bytes"
        if phase == "encode" or phase in TRAIN_PHASES:  # a causal LM's inference run has neither: null, with the reason
            assert record[name] is None and "did not run" in record["na_reasons"][name]
            continue
        assert record[name] > 0 and record[f"peak_rss_anon_{phase}_bytes"] > 0, phase
        peaks[phase] = record[name]
    assert record["peak_memory_bytes"] == max(peaks.values())
    assert record["peak_memory_phase"] == max(peaks, key=peaks.get)
    assert record["peak_rss_method"] == "clear_refs"  # VmHWM resets work on this kernel
    logits_chunk = CHUNK_TOKENS * 128_256 * 4
    assert record["peak_rss_anon_quality_bytes"] - record["peak_rss_anon_load_bytes"] > 0.8 * logits_chunk
    assert record["peak_memory_bytes"] >= record["peak_rss_quality_bytes"] > record["peak_rss_load_bytes"]
    assert record["eval_tokens"] <= record["eval_tokens_requested"] == 512
    assert isinstance(record["contended"], bool) and record["contention"]
    assert record["prefill_tok_s_ci_rel"] is not None and isinstance(record["budget_limited"], list)
