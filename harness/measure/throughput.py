"""Prefill, decode and encode throughput: warm up, repeat until the median is stable or the phase's
time budget is spent (harness.stats), keep the raw samples, report median, IQR and CI."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from harness.backends.base import Backend
from harness.measure.trackers import PhaseMeter, PhaseResult
from harness.options import RunOptions
from harness.stats import RepeatOutcome, RepeatPolicy, median_iqr, policy_for, repeat_until

MAX_REPEAT_FACTOR = 10  # never more than 10x the asked repeats, whatever min_timing_s or the CI target say


def repeat_policy(options: RunOptions) -> RepeatPolicy:
    """The options' stopping rule, capped at MAX_REPEAT_FACTOR x timing_repeats samples."""
    policy = policy_for(options)
    cap = max(options.timing_repeats * MAX_REPEAT_FACTOR, policy.min_samples)
    return RepeatPolicy(policy.target_ci_rel, policy.budget_s, policy.min_samples, policy.min_time_s, cap)


def timed_repeats(
    run: Callable[[], Any],
    synchronize: Callable[[], None],
    options: RunOptions,
    rate_of: Callable[[float], float] | None = None,
) -> RepeatOutcome:
    """`warmup` untimed calls, then timed ones until harness.stats says stop.

    Each sample's value is `rate_of(seconds)` where given (the rate the phase reports), else the
    seconds: the stop rule and the reported CI (`RepeatOutcome.ci_rel`) are over the same numbers.
    The time budget counts the seconds.
    """
    for _ in range(options.warmup):
        run()
    synchronize()

    def one() -> tuple[float, float]:
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        elapsed = time.perf_counter() - start
        return (rate_of(elapsed) if rate_of else elapsed), elapsed

    return repeat_until(one, repeat_policy(options))


def timed_samples(run: Callable[[], Any], synchronize: Callable[[], None], options: RunOptions) -> list[float]:
    """The seconds of `timed_repeats`."""
    return timed_repeats(run, synchronize, options).values


def prompt_batch(eval_ids: np.ndarray, prompt_length: int, batch_size: int) -> np.ndarray:
    """[batch, prompt_length] token ids cut from the eval text (tiled if it is short)."""
    reps = -(-prompt_length * batch_size // len(eval_ids))
    stream = np.tile(eval_ids, reps)[: prompt_length * batch_size]
    return stream.reshape(batch_size, prompt_length)


def measure_prefill(backend: Backend, ids: np.ndarray, options: RunOptions) -> dict[str, Any]:
    """Tokens per second of one forward over the prompt (as generate's prefill runs it)."""
    outcome = timed_repeats(lambda: backend.prefill(ids), backend.synchronize, options, lambda s: ids.size / s)
    median, iqr = median_iqr(outcome.values)
    return {"prefill_tok_s": median, "prefill_tok_s_iqr": iqr, "prefill_tok_s_samples": outcome.values,
            "prefill_tok_s_ci_rel": outcome.ci_rel, "budget_limited": ["prefill"] * outcome.budget_limited}  # fmt: skip


def measure_encode(backend: Backend, ids: np.ndarray, options: RunOptions) -> dict[str, Any]:
    """Sequences per second of an encoder forward."""
    mask = np.ones_like(ids)
    outcome = timed_repeats(lambda: backend.embed(ids, mask), backend.synchronize, options, lambda s: ids.shape[0] / s)
    median, iqr = median_iqr(outcome.values)
    return {"encode_samples_s": median, "encode_samples_s_iqr": iqr, "encode_samples_s_samples": outcome.values,
            "encode_samples_s_ci_rel": outcome.ci_rel, "budget_limited": ["encode"] * outcome.budget_limited}  # fmt: skip


def measure_decode(backend: Backend, ids: np.ndarray, options: RunOptions) -> dict[str, Any]:
    """Greedy generate of exactly N new tokens, timestamped as each token lands.

    Per timed repeat, with t = the token times (offsets from generate start, after a synchronize):
    decode rate = (N-1) x batch / (t[N-1] - t[0]) (the first token is the prefill's), TTFT = t[0],
    latencies = consecutive differences of t, generate rate = N x batch / the whole call.
    The last repeat's t is kept as `decode_token_times_s`, so a record can be checked against itself.
    """
    batch, steps = ids.shape[0], options.new_tokens
    decode_rates, generate_rates, ttfts, latencies = [], [], [], []
    stamps: list[float] = []

    def on_token() -> None:
        backend.synchronize()
        stamps.append(time.perf_counter())

    def one_generate() -> tuple[float, list[float]]:
        """(seconds of the whole call, each token's offset from its start)."""
        stamps.clear()
        backend.synchronize()
        start = time.perf_counter()
        out = backend.generate(ids, steps, on_token)
        backend.synchronize()
        end = time.perf_counter()
        if out.shape != (batch, steps) or len(stamps) != steps:
            raise RuntimeError(f"asked generate for {steps} new tokens, got {out.shape[1]} ({len(stamps)} timestamps)")
        return end - start, [stamp - start for stamp in stamps]

    for _ in range(options.warmup):
        one_generate()
    token_times: list[float] = []

    def one() -> tuple[float, float]:
        """One timed generate: (its decode rate, its seconds). The stop rule sees the decode rate, the
        quantity decode_tok_s_ci_rel reports (with 1 new token there is no decode: the generate rate)."""
        nonlocal token_times
        elapsed, token_times = one_generate()
        ttfts.append(token_times[0])
        latencies.extend(np.diff(token_times).tolist())
        decode_rates.append(batch * (steps - 1) / (token_times[-1] - token_times[0]) if steps > 1 else float("nan"))
        generate_rates.append(batch * steps / elapsed)
        return (decode_rates[-1] if steps > 1 else generate_rates[-1]), elapsed

    outcome = repeat_until(one, repeat_policy(options))
    median, iqr = median_iqr(decode_rates)
    return {
        "decode_tok_s": median,
        "decode_tok_s_iqr": iqr,
        "decode_tok_s_samples": decode_rates,
        "decode_tok_s_ci_rel": outcome.ci_rel if steps > 1 else None,
        "budget_limited": ["decode"] * outcome.budget_limited,
        "decode_token_times_s": token_times,
        "generate_tok_s": statistics.median(generate_rates),
        "ttft_s": statistics.median(ttfts),
        "ttft_s_samples": ttfts,
        "token_latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "token_latency_p90_s": float(np.percentile(latencies, 90)) if latencies else None,
        "new_tokens": steps,
    }


def measure_throughput(
    backend: Backend, kind: str, eval_ids: np.ndarray, options: RunOptions, phases: list[PhaseResult] | None = None
) -> dict[str, Any]:
    """Every (prompt length, batch size) point; the first is the record's main fields, the rest `sweep`.

    Each point's prefill, decode (causal LMs) or encode runs inside a PhaseMeter; the main point's
    phase results are appended to `phases` (memory and contention fields), the sweep points carry
    their own `peak_rss_<phase>_bytes`.
    """
    points: list[dict[str, Any]] = []
    max_positions = backend.max_positions()
    for prompt_length in options.prompt_lengths:
        for batch_size in options.batch_sizes:
            point: dict[str, Any] = {"prompt_length": prompt_length, "batch_size": batch_size}
            needed = prompt_length + (options.new_tokens if kind == "causal-lm" else 0)
            if max_positions is not None and needed > max_positions:
                point["skip_reason"] = f"needs {needed} positions; the model has {max_positions}"
                points.append(point)
                continue
            ids = prompt_batch(eval_ids, prompt_length, batch_size)
            steps = (("prefill", measure_prefill), ("decode", measure_decode)) if kind == "causal-lm" else (
                ("encode", measure_encode),)  # fmt: skip
            limited: list[str] = []
            for name, measure in steps:
                with PhaseMeter(name, backend, timed=True) as meter:
                    result = measure(backend, ids, options)
                limited += result.pop("budget_limited")
                point.update(result)
                point[f"peak_rss_{name}_bytes"] = meter.result.host.peak_rss_bytes
                if phases is not None and not points:
                    phases.append(meter.result)
            point["budget_limited"] = limited
            points.append(point)
    main, rest = points[0], points[1:]
    if "skip_reason" in main:
        raise ValueError(f"prompt length {main['prompt_length']}: {main['skip_reason']}; lower --prompt-lengths")
    return main | {"sweep": rest}
