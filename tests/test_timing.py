"""Issue 10: the timing code against a device double, with a deterministic clock.

The double stands in for an asynchronous device (as CUDA is): each call queues work and returns at
once, and only synchronize() waits for the queue. Its host clock advances only while the host
waits, so a clock read that is not right after a synchronize() misses the queued work. The timing
code itself (timed_samples, measure_prefill/decode/encode/throughput, trackers.Timer,
copy_bandwidth_bytes_s) is real; `time.perf_counter` as those modules see it reads the double's clock.

Every duration is a power of two, so the arithmetic is exact and compared with ==.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from harness.measure import throughput, trackers
from harness.measure.throughput import (
    MAX_REPEAT_FACTOR,
    measure_decode,
    measure_encode,
    measure_prefill,
    measure_throughput,
    timed_samples,
)
from harness.measure.trackers import Timer, copy_bandwidth_bytes_s
from harness.options import RunOptions
from harness.stats import median_ci_rel

PREFILL_S = 2.0**-6  # one prompt forward (and so the first generated token)
STEP_S = 2.0**-9  # one decode step after the first token
EMBED_S = 2.0**-7
COPY_S = 2.0**-8
LOAD_S = 2.0**-2
SYNC = "synchronize"
CLOCK = "clock"


class DeviceDouble:
    """A Backend whose device work is queued, with an event log of every call and clock read."""

    framework = "double"

    def __init__(self, max_positions: int | None = None) -> None:
        self.events: list[str] = []
        self.host_s = 0.0  # the host clock: moves only when the host waits for the device
        self.device_free_s = 0.0  # when the queued device work finishes
        self._max_positions = max_positions

    def _queue(self, name: str, seconds: float) -> None:
        self.events.append(name)
        self.device_free_s = max(self.device_free_s, self.host_s) + seconds

    def perf_counter(self) -> float:
        self.events.append(CLOCK)
        return self.host_s

    def synchronize(self) -> None:
        self.events.append(SYNC)
        self.host_s = max(self.host_s, self.device_free_s)

    def load(self) -> None:
        self._queue("load", LOAD_S)

    def prefill(self, input_ids: np.ndarray) -> None:
        self._queue("prefill", PREFILL_S)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        self._queue("logits", PREFILL_S)
        return np.zeros((*input_ids.shape, 8), dtype=np.float32)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self._queue("embed", EMBED_S)
        return np.zeros((input_ids.shape[0], 8), dtype=np.float32)

    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        for step in range(new_tokens):
            self._queue("decode-step", PREFILL_S if step == 0 else STEP_S)
            if on_token:
                on_token()
        return np.zeros((input_ids.shape[0], new_tokens), dtype=np.int64)

    def max_positions(self) -> int | None:
        return self._max_positions

    def copy(self) -> None:
        self._queue("copy", COPY_S)

    def clock_reads_without_synchronize(self) -> list[int]:
        """Indices of clock reads whose previous event is not a synchronize() (a device call came between)."""
        return [i for i, event in enumerate(self.events) if event == CLOCK and (i == 0 or self.events[i - 1] != SYNC)]


class DoubleClockTime:
    """The `time` module as the timing code sees it, with perf_counter reading the double's clock."""

    def __init__(self, device: DeviceDouble) -> None:
        self.perf_counter = device.perf_counter

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> DeviceDouble:
    double = DeviceDouble(max_positions=1024)
    module: ModuleType
    for module in (throughput, trackers):
        monkeypatch.setattr(module, "time", DoubleClockTime(double))
    return double


def options(**overrides: Any) -> RunOptions:
    return RunOptions(**({"timing_repeats": 3, "min_timing_s": 0.0, "warmup": 1, "new_tokens": 5} | overrides))


def ids(prompt_length: int = 16, batch_size: int = 1) -> np.ndarray:
    return np.ones((batch_size, prompt_length), dtype=np.int64)


# --- the synchronization discipline ---------------------------------------------------------


def timed_load(device: DeviceDouble) -> float:
    with Timer(device.synchronize) as timer:
        device.load()
    return timer.elapsed_s


TIMED_CODE: dict[str, Callable[[DeviceDouble], Any]] = {
    "timed_samples": lambda d: timed_samples(lambda: d.prefill(ids()), d.synchronize, options()),
    "measure_prefill": lambda d: measure_prefill(d, ids(), options()),
    "measure_decode": lambda d: measure_decode(d, ids(), options()),
    "measure_encode": lambda d: measure_encode(d, ids(), options()),
    "measure_throughput causal-lm": lambda d: measure_throughput(
        d, "causal-lm", np.arange(50), options(prompt_lengths=(16, 32), batch_sizes=(1, 2))
    ),
    "measure_throughput encoder": lambda d: measure_throughput(d, "encoder", np.arange(50), options()),
    "Timer": lambda d: timed_load(d),
    "copy_bandwidth_bytes_s": lambda d: copy_bandwidth_bytes_s(d.copy, d.synchronize, 1 << 20),
}


@pytest.mark.parametrize("name", TIMED_CODE)
def test_every_clock_read_directly_follows_a_synchronize(device: DeviceDouble, name: str) -> None:
    TIMED_CODE[name](device)
    assert device.events.count(CLOCK) >= 2, "the timing code must read the clock through time.perf_counter"
    bad = device.clock_reads_without_synchronize()
    assert not bad, f"clock read without synchronize() right before it: {[device.events[i - 1] for i in bad]}"


def test_the_check_catches_a_clock_read_after_device_work(device: DeviceDouble) -> None:
    """The double is not blind: an undisciplined timer is caught, and it measures nothing."""
    device.synchronize()
    begin = device.perf_counter()
    device.prefill(ids())
    elapsed = device.perf_counter() - begin  # no synchronize(): the queued prefill is not waited for
    assert elapsed == 0.0
    assert device.clock_reads_without_synchronize() == [len(device.events) - 1]


def test_timer_and_copy_bandwidth_measure_the_queued_work(device: DeviceDouble) -> None:
    assert timed_load(device) == LOAD_S
    assert copy_bandwidth_bytes_s(device.copy, device.synchronize, 1 << 20) == 2 * (1 << 20) / COPY_S


# --- the arithmetic, at batch 1 and above ----------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_prefill_decode_and_encode_arithmetic(device: DeviceDouble, batch_size: int) -> None:
    prompt, new_tokens = 16, 5
    prefill = measure_prefill(device, ids(prompt, batch_size), options())
    assert prefill["prefill_tok_s_samples"] == [prompt * batch_size / PREFILL_S] * 3
    decode = measure_decode(device, ids(prompt, batch_size), options(new_tokens=new_tokens))
    # (N-1) x batch tokens over the span from the first token to the last
    assert decode["decode_tok_s_samples"] == [batch_size / STEP_S] * 3
    assert decode["decode_token_times_s"] == [PREFILL_S + i * STEP_S for i in range(new_tokens)]
    assert decode["ttft_s_samples"] == [PREFILL_S] * 3 and decode["ttft_s"] == PREFILL_S
    assert decode["generate_tok_s"] == new_tokens * batch_size / (PREFILL_S + (new_tokens - 1) * STEP_S)
    assert decode["token_latency_p50_s"] == decode["token_latency_p90_s"] == STEP_S
    times = decode["decode_token_times_s"]
    assert decode["decode_tok_s_samples"][-1] == (new_tokens - 1) * batch_size / (times[-1] - times[0])
    encode = measure_encode(device, ids(prompt, batch_size), options())
    assert encode["encode_samples_s_samples"] == [batch_size / EMBED_S] * 3


def test_sweep_points_in_order_with_a_skip_reason_past_max_positions(device: DeviceDouble) -> None:
    result = measure_throughput(
        device, "causal-lm", np.arange(50), options(prompt_lengths=(16, 40, 1022), batch_sizes=(1, 3))
    )
    assert (result["prompt_length"], result["batch_size"]) == (16, 1)
    points = [(p["prompt_length"], p["batch_size"]) for p in result["sweep"]]
    assert points == [(16, 3), (40, 1), (40, 3), (1022, 1), (1022, 3)]
    for point in [result, *result["sweep"]]:
        prompt, batch = point["prompt_length"], point["batch_size"]
        if prompt == 1022:  # 1022 + 5 new tokens > 1024 positions
            assert point["skip_reason"] == "needs 1027 positions; the model has 1024"
            assert "prefill_tok_s" not in point
            continue
        assert point["prefill_tok_s"] == prompt * batch / PREFILL_S
        assert point["decode_tok_s"] == batch / STEP_S
    with pytest.raises(ValueError, match="prompt length 1022: needs 1027 positions"):
        measure_throughput(device, "causal-lm", np.arange(50), options(prompt_lengths=(1022, 16)))


# --- repeats: extended to a minimum duration, capped at 10x ----------------------------------


def test_repeats_are_not_extended_without_a_minimum_duration(device: DeviceDouble) -> None:
    samples = timed_samples(lambda: device.prefill(ids()), device.synchronize, options(warmup=2))
    assert samples == [PREFILL_S] * 3
    assert device.events.count("prefill") == 2 + 3


def test_repeats_extend_until_they_add_up_to_the_minimum_duration(device: DeviceDouble) -> None:
    # 6 x 2**-6 s = 0.094 s < 0.1 s <= 7 x 2**-6 s
    samples = timed_samples(lambda: device.prefill(ids()), device.synchronize, options(min_timing_s=0.1))
    assert samples == [PREFILL_S] * 7
    decode = measure_decode(device, ids(), options(min_timing_s=0.1))
    generate_s = PREFILL_S + 4 * STEP_S  # 2**-6 + 2**-7: 5 calls reach 0.117 s, 4 only 0.094 s
    assert len(decode["decode_tok_s_samples"]) == 5 and 4 * generate_s < 0.1 <= 5 * generate_s


def test_repeat_extension_is_capped_at_10x_the_asked_repeats(device: DeviceDouble) -> None:
    assert MAX_REPEAT_FACTOR == 10
    long = options(timing_repeats=2, min_timing_s=1000.0)
    assert len(timed_samples(lambda: device.prefill(ids()), device.synchronize, long)) == 20
    assert len(measure_decode(device, ids(), long)["decode_tok_s_samples"]) == 20
    assert len(measure_encode(device, ids(), long)["encode_samples_s_samples"]) == 20


# --- the stop rule and the reported CI are over the same numbers ------------------------------


class SlowFirstTokenDouble(DeviceDouble):
    """A first token (prefill) that takes 1x, 4x, 16x, 1x, ... PREFILL_S while every later step takes
    STEP_S: whole-generate seconds vary by up to 9x, decode rates (after the first token) not at all."""

    def __init__(self) -> None:
        super().__init__(max_positions=1024)
        self.calls = 0

    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        self.calls += 1
        for step in range(new_tokens):
            first = PREFILL_S * 4 ** (self.calls % 3)
            self._queue("decode-step", first if step == 0 else STEP_S)
            if on_token:
                on_token()
        return np.zeros((input_ids.shape[0], new_tokens), dtype=np.int64)


def test_decode_repeats_stop_on_the_decode_rate_they_report(monkeypatch: pytest.MonkeyPatch) -> None:
    double = SlowFirstTokenDouble()
    monkeypatch.setattr(throughput, "time", DoubleClockTime(double))
    decode = measure_decode(double, ids(), options(time_budget_s=10.0, target_ci_rel=0.05))
    # stable decode rates: the CI target holds at the minimum samples (the generate seconds' CI is ~80 %)
    assert decode["decode_tok_s_samples"] == [1 / STEP_S] * 3
    assert decode["decode_tok_s_ci_rel"] == median_ci_rel(decode["decode_tok_s_samples"]) == 0.0
    assert decode["budget_limited"] == []
