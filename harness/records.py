"""The record schema: one flat row per combination, with units in the field names.

Every field is always present. A field that does not apply is null and `na_reasons` says why.
Units: `_s` seconds, `_bytes` bytes, `_tok_s` tokens per second, `_samples_s` sequences per
second; `*_samples` keep the raw repeats behind a median.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "skipped")
ERROR_KINDS = ("oom", "timeout", "crash", "error")


@dataclass
class Record:
    """Everything measured for one (model, framework, precision, device) combination."""

    # --- identity and outcome -------------------------------------------------------------
    model: str
    framework: str
    precision: str
    device: str
    status: str  # ok | failed | skipped
    run_id: str = ""
    env_id: str = ""
    hardware_id: str = ""
    schema_version: int = SCHEMA_VERSION
    finished_at: str = ""  # ISO 8601, UTC
    error_kind: str | None = None  # oom | timeout | crash | error (failed only)
    error: str | None = None  # one line (failed only)
    skip_reason: str | None = None  # skipped only
    na_reasons: dict[str, str] = field(default_factory=dict)  # null field -> why

    # --- what was loaded --------------------------------------------------------------------
    model_source: str | None = None  # local path handed to from_pretrained (a hub id resolves to its cached snapshot)
    model_revision: str | None = None  # hub snapshot commit hash (hub ids only)
    tokenizer_source: str | None = None  # where the tokenizer came from (--tokenizer, or the model dir)
    model_kind: str | None = None  # causal-lm | encoder
    architecture: str | None = None  # e.g. LlamaForCausalLM
    param_count: int | None = None  # logical parameters (a 4-bit weight counts per element)
    storage_dtype: str | None = None  # dtype of the modules left unquantized
    compute_dtype: str | None = None  # dtype the matmuls run in
    quantized_modules: int | None = None  # linear layers replaced by the quantizer
    quantized_param_frac: float | None = None  # share of parameters that were quantized
    quant_state_bytes: int | None = None  # absmax/scales/codebooks kept by the quantizer
    quant_state_device: str | None = None  # device the quantized weights and their states live on

    # --- timing: loading --------------------------------------------------------------------
    import_s: float | None = None  # framework import in a fresh interpreter, once per run
    quantizer_import_s: float | None = (
        None  # the precision's quantizer/loader library import, in the worker, before load_s
    )
    device_init_s: float | None = None  # CUDA context creation in the worker, before load_s (not inside it)
    load_s: float | None = None  # median over fresh workers: from_pretrained to synchronized
    load_s_samples: list[float] = field(default_factory=list)
    load_s_iqr: float | None = None
    first_forward_s: float | None = None  # first forward after load, synchronized
    first_forward_max_abs: float | None = None  # largest |output| of that forward (finite, or the record fails)
    worker_wall_s: float | None = None  # parent-side wall time of the measuring worker
    worker_start_s: float | None = None  # parent start() to the worker's first line
    worker_pid: int | None = None  # pid of the measuring worker (to match NVML's process list)

    # --- size -------------------------------------------------------------------------------
    weight_bytes: int | None = None  # parameters + buffers + quant states, each storage once
    predicted_weight_bytes: int | None = None  # the memory plan's weights, from config.json before any load
    predicted_peak_bytes: int | None = None  # the plan's weights + KV cache + largest activation + load transient
    checkpoint_bytes: int | None = None  # weight files on disk

    # --- host memory (worker process) -----------------------------------------------------
    rss_before_load_bytes: int | None = None  # baseline after imports, before from_pretrained
    peak_rss_bytes: int | None = None  # kernel high-water mark over load + first forward
    peak_rss_anon_bytes: int | None = None  # sampled peak of anonymous memory, same span
    peak_rss_quality_bytes: int | None = None  # kernel high-water mark over the quality pass
    peak_rss_anon_quality_bytes: int | None = None  # sampled anonymous peak over the quality pass
    rss_after_load_bytes: int | None = None  # = rss_anon + rss_file + rss_shmem, after load
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None  # file-backed pages (memory-mapped checkpoint)
    rss_shmem_bytes: int | None = None

    # --- device memory (CUDA only) ---------------------------------------------------------
    peak_device_allocated_bytes: int | None = None  # allocator peak over load + first forward
    peak_device_reserved_bytes: int | None = None
    device_process_bytes: int | None = None  # NVML: this process's use after load

    # --- throughput ---------------------------------------------------------------------------
    prompt_length: int | None = None
    batch_size: int | None = None
    new_tokens: int | None = None
    prefill_tok_s: float | None = None  # prompt tokens x batch / forward time, median
    prefill_logits: str | None = None  # positions whose logits the timed prefill computes: last | all
    prefill_tok_s_iqr: float | None = None
    prefill_tok_s_samples: list[float] = field(default_factory=list)
    decode_tok_s: float | None = None  # new tokens x batch / decode time (after 1st token)
    decode_tok_s_iqr: float | None = None
    decode_tok_s_samples: list[float] = field(default_factory=list)
    decode_token_times_s: list[float] = field(default_factory=list)  # s, generate start to each new token, last repeat
    generate_tok_s: float | None = None  # new tokens x batch / whole generate call
    ttft_s: float | None = None  # generate start to first new token, median
    ttft_s_samples: list[float] = field(default_factory=list)  # s, one per timed repeat
    token_latency_p50_s: float | None = None  # between consecutive new tokens
    token_latency_p90_s: float | None = None
    encode_samples_s: float | None = None  # encoders: sequences per second, median
    encode_samples_s_iqr: float | None = None
    encode_samples_s_samples: list[float] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)  # other prompt/batch points
    memory_bandwidth_bytes_s: float | None = None  # device copy bandwidth, once per run
    decode_roofline_tok_s: float | None = None  # bandwidth / weight_bytes (batch 1)
    decode_roofline_frac: float | None = None  # decode_tok_s / decode_roofline_tok_s
    load_bandwidth_bytes_s: float | None = None  # checkpoint_bytes / load_s

    # --- quality against the reference -------------------------------------------------------
    reference_precision: str | None = None
    eval_tokens: int | None = None
    kl_mean: float | None = None  # mean per-token KL(reference || this), nats
    kl_mean_ci_low: float | None = None
    kl_mean_ci_high: float | None = None
    kl_p99: float | None = None
    top1_agree: float | None = None
    ppl: float | None = None
    ppl_delta_frac: float | None = None  # (ppl - ppl_ref) / ppl_ref
    ppl_delta_frac_ci_low: float | None = None
    ppl_delta_frac_ci_high: float | None = None
    max_abs_logit_diff: float | None = None
    greedy_match_frac: float | None = None  # mean matching prefix before the first divergence / greedy tokens
    greedy_token_agree: float | None = None  # share of greedy positions whose token equals the reference's
    greedy_tokens_generated: int | None = None  # new tokens per prompt the greedy pass produced
    greedy_first_diverge: list[int | None] = field(default_factory=list)  # per prompt
    embed_cosine_mean: float | None = None
    embed_cosine_min: float | None = None
    rank_agree: float | None = None  # Spearman of pair similarities vs the reference
    roundtrip_max_abs_diff: float | None = None  # outputs after save_pretrained -> from_pretrained

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Build a record, ignoring unknown keys (newer schemas) and defaulting missing ones."""
        known = set(cls.field_names())
        return cls(**{k: v for k, v in data.items() if k in known})


def na(record_fields: dict[str, Any], reasons: dict[str, str], reason: str, *names: str) -> None:
    """Mark `names` as not applicable: null value, with `reason` recorded."""
    for name in names:
        record_fields[name] = None
        reasons[name] = reason
