"""What every backend provides to the scenarios, independent of the framework."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class LoadSpec:
    """What to load, how, and where."""

    source: str  # local directory or hub id
    kind: str  # causal-lm | encoder
    precision: str
    device: str
    allow_pickle: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = None  # tokenizer dir or hub id (backends that tokenize themselves check theirs against it)


@dataclass
class WeightStats:
    """Bytes the loaded weights hold, counted from the tensors themselves."""

    weight_bytes: int
    param_count: int
    quant_state_bytes: int = 0
    quantized_modules: int = 0
    quantized_param_frac: float = 0.0
    storage_dtype: str | None = None
    compute_dtype: str | None = None
    architecture: str | None = None
    quant_state_device: str | None = None  # where quantized weights and their states live
    notes: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """Load and run one model in one framework. All arrays crossing this seam are numpy."""

    framework: str
    spec: LoadSpec
    prefill_logits: str | None  # after load: positions whose logits prefill() computes, "last" or "all"

    def prepare(self) -> dict[str, float | None]:
        """Imports and device set-up that load_s must not include; returns quantizer_import_s, device_init_s."""

    def limit_device_memory(self, limit_bytes: int) -> None:
        """Cap device memory for --memory-limit (a no-op where the device is the host)."""

    def load(self) -> None:
        """Load the weights onto the device (the span `load_s` measures)."""

    # Optional: `weight_files() -> list[Path]`, the files load() reads where they are not the
    # checkpoint's own weight files (llama.cpp: the GGUF file prepare() made). checkpoint_bytes, the
    # load bandwidths and the cold load's page drop use them (harness.measure.inference.loaded_files).

    def synchronize(self) -> None:
        """Wait for queued device work to finish."""

    def weight_stats(self) -> WeightStats: ...

    def reset_device_peaks(self) -> None: ...

    def device_memory(self) -> dict[str, int | None]:
        """peak_device_allocated_bytes, peak_device_reserved_bytes, device_process_bytes."""

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Causal LMs: float32 logits [batch, tokens, vocab] of one forward pass."""

    def prefill(self, input_ids: np.ndarray) -> None:
        """One forward over a prompt, outputs left on the device (the span prefill_tok_s times)."""

    def max_positions(self) -> int | None:
        """Longest sequence the model accepts, if it says."""

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Encoders: float32 mean-pooled embeddings [batch, hidden] of one forward pass."""

    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        """Greedy generation of exactly `new_tokens`; `on_token` is called as each token lands."""

    def roundtrip_max_abs_diff(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> float:
        """Save, load back, and compare one forward's outputs; NotImplementedError if not serializable."""

    def memory_bandwidth_bytes_s(self) -> float:
        """Device copy bandwidth (read + write bytes per second) from a large copy."""
