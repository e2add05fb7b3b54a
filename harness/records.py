"""The record schema: one flat row per combination, with units in the field names.

Every field is always present. A field that does not apply is null and `na_reasons` says why.
Units: `_s` seconds, `_bytes` bytes, `_tok_s` tokens per second, `_samples_s` sequences per
second; `*_samples` keep the raw repeats behind a median.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from harness.units import MIB_LABEL

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "skipped")
ERROR_KINDS = ("oom", "timeout", "crash", "error")
TRAIN_PHASES = ("train_forward", "train_backward", "train_optimizer")  # a training step's measured phases

# na_reasons the parent writes for what a worker measured without (declared here, with the schema, so
# the parent imports no measuring module for them)
NO_TOKENIZER_REASON = "no tokenizer: pass --tokenizer"
NVML_NO_PID_REASON = (
    "NVML lists no process with this worker's pid (pid namespaces differ, e.g. in a container), or NVML is unavailable"
)


@dataclass(frozen=True)
class Metric:
    """What a metric field is: its unit, its direction, its group, and where its raw samples are.
    Declared once on the Record field; regressions, Pareto axes, budgets, table headers, trends and
    pytest-benchmark's extra_info all read it (`METRICS`)."""

    unit: str  # s, bytes, tok/s, seq/s, nats, frac, ...
    higher_is_better: bool
    group: str  # load | size | memory | throughput | quality | finetune
    samples: str | None = None  # the field holding the raw repeats behind the median (verdicts need them)
    budget: bool = False  # a matrix file may set a budget on it: max_<field> or min_<field>
    label: str = ""  # column header in reports

    @property
    def direction(self) -> str:
        """ "max" when higher is better, else "min" (Pareto objectives, budget prefixes)."""
        return "max" if self.higher_is_better else "min"


def metric(
    unit: str,
    higher_is_better: bool,
    group: str,
    *,
    samples: str | None = None,
    budget: bool = False,
    label: str = "",
) -> Any:
    """A nullable Record field that is a metric (see `Metric`)."""
    info = Metric(unit, higher_is_better, group, samples, budget, label)
    return field(default=None, metadata={"metric": info})


@dataclass
class Record:
    """Everything measured for one (model, framework, precision, device) combination."""

    # --- identity and outcome -------------------------------------------------------------
    model: str
    framework: str
    precision: str
    device: str
    status: str  # ok | failed | skipped
    scenario: str = "inference"  # inference | finetune (harness.measure.finetune): what was measured
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
    weight_notes: dict[str, str] = field(
        default_factory=dict
    )  # the backend's notes on its weights, e.g. GGUF tensor types
    family: str | None = None  # the precision's quantizer family (registry), e.g. bitsandbytes, torchao, quanto
    quantization: str | None = None  # a pre-quantized checkpoint's method, bits, group size (as-saved only)

    # --- timing: loading --------------------------------------------------------------------
    import_s: float | None = None  # framework import in a fresh interpreter, once per run
    quantizer_import_s: float | None = (
        None  # the precision's quantizer/loader library import, in the worker, before load_s
    )
    device_init_s: float | None = None  # CUDA context creation in the worker, before load_s (not inside it)
    load_s: float | None = metric(
        "s", False, "load", samples="load_s_samples", budget=True, label="load_s"
    )  # median over fresh workers: from_pretrained to synchronized
    load_s_samples: list[float] = field(default_factory=list)
    load_s_iqr: float | None = None
    load_s_ci_rel: float | None = None  # relative half-width of the median's 95 % CI over load_s_samples
    load_cold_s: float | None = metric(
        "s", False, "load", label="cold load_s"
    )  # a load after dropping the checkpoint's pages from the page cache (own worker)
    page_cache_resident_frac_before: float | None = None  # share of checkpoint pages cached when load_cold_s began
    page_cache_resident_frac_before_load: float | None = None  # the least-cached start among the warm loads (mincore)
    page_cache_resident_frac_before_load_samples: list[float | None] = field(
        default_factory=list
    )  # per warm load, in load_s_samples' order: ~1.0 warm; lower means that sample read the disk
    raw_read_bytes_s: float | None = None  # sequential cold read of the weight files, same run (16 MiB reads)
    load_cold_bandwidth_frac: float | None = None  # (checkpoint_bytes / load_cold_s) / raw_read_bytes_s
    convert_s: float | None = None  # llama.cpp: seconds this worker spent converting/quantizing to GGUF (0: cached)
    convert_recorded_s: float | None = None  # llama.cpp: what making this GGUF file took when it was made
    gguf_reused: bool | None = None  # llama.cpp: the GGUF file came from the conversion cache
    first_forward_s: float | None = metric(
        "s", False, "load", label="first forward s"
    )  # first forward after load, synchronized
    first_forward_max_abs: float | None = None  # largest |output| of that forward (finite, or the record fails)
    worker_wall_s: float | None = None  # parent-side wall time of the measuring worker
    worker_start_s: float | None = None  # parent start() to the worker's first line
    worker_pid: int | None = None  # pid of the measuring worker (to match NVML's process list)

    # --- size -------------------------------------------------------------------------------
    weight_bytes: int | None = metric(
        "bytes", False, "size", budget=True, label=f"weight {MIB_LABEL}"
    )  # parameters + buffers + quant states, each storage once
    predicted_weight_bytes: int | None = None  # the memory plan's weights, from config.json before any load
    predicted_peak_bytes: int | None = None  # the plan's weights + KV cache + largest activation + load transient
    # the plan phase by phase, for the measured peaks: host RSS growth over rss_before_load_bytes (cpu:
    # weights, checkpoint pages mapped while loading, the phase's activations, the runtime's pages) ...
    predicted_host_peak_bytes: int | None = None
    # ... and the device allocator's peak (cuda, xla: weights + the largest phase's own tensors)
    predicted_device_peak_bytes: int | None = None
    checkpoint_bytes: int | None = metric(
        "bytes", False, "size", label=f"checkpoint {MIB_LABEL}"
    )  # weight files on disk

    # --- host memory (worker process) -----------------------------------------------------
    rss_before_load_bytes: int | None = None  # baseline after imports, before from_pretrained
    peak_rss_bytes: int | None = metric(
        "bytes", False, "memory", label=f"peak RSS {MIB_LABEL}"
    )  # kernel high-water mark over load + first forward
    peak_rss_anon_bytes: int | None = None  # sampled peak of anonymous memory, same span
    peak_rss_quality_bytes: int | None = None  # kernel high-water mark over the quality pass
    peak_rss_anon_quality_bytes: int | None = None  # sampled anonymous peak over the quality pass
    # per phase, VmHWM reset at each phase's start (/proc/self/clear_refs); anon = sampled RssAnon peak
    peak_rss_load_bytes: int | None = None  # high-water mark over from_pretrained
    peak_rss_anon_load_bytes: int | None = None
    peak_rss_first_forward_bytes: int | None = None  # high-water mark over the first forward
    peak_rss_anon_first_forward_bytes: int | None = None
    peak_rss_prefill_bytes: int | None = None  # high-water mark over warm-up + timed prefills (main point)
    peak_rss_anon_prefill_bytes: int | None = None
    peak_rss_decode_bytes: int | None = None  # high-water mark over warm-up + timed generates (main point)
    peak_rss_anon_decode_bytes: int | None = None
    peak_rss_encode_bytes: int | None = None  # encoders: high-water mark over the timed encodes
    peak_rss_anon_encode_bytes: int | None = None
    peak_rss_method: str | None = None  # clear_refs: kernel VmHWM reset per phase | sampled: 5-20 ms RSS samples
    peak_memory_bytes: int | None = metric(
        "bytes", False, "memory", budget=True, label=f"peak memory {MIB_LABEL}"
    )  # headline: max over every phase of peak RSS (cpu) or allocator peak (cuda)
    peak_memory_phase: str | None = None  # the phase that set peak_memory_bytes
    rss_after_load_bytes: int | None = None  # = rss_anon + rss_file + rss_shmem, after load
    rss_anon_bytes: int | None = None
    rss_file_bytes: int | None = None  # file-backed pages (memory-mapped checkpoint)
    rss_shmem_bytes: int | None = None

    # --- device memory (CUDA only) ---------------------------------------------------------
    peak_device_allocated_bytes: int | None = metric(
        "bytes", False, "memory", label=f"device {MIB_LABEL}"
    )  # allocator peak over load + first forward
    peak_device_reserved_bytes: int | None = None
    device_process_bytes: int | None = None  # NVML: this process's use after load
    device_process_end_bytes: int | None = None  # NVML: this process's use at the end of the worker
    peak_device_allocated_load_bytes: int | None = None  # allocator peak per phase, reset at each phase's start
    peak_device_allocated_first_forward_bytes: int | None = None
    peak_device_allocated_prefill_bytes: int | None = None
    peak_device_allocated_decode_bytes: int | None = None
    peak_device_allocated_encode_bytes: int | None = None
    peak_device_allocated_quality_bytes: int | None = None

    # --- throughput ---------------------------------------------------------------------------
    prompt_length: int | None = None
    batch_size: int | None = None
    new_tokens: int | None = None
    prefill_tok_s: float | None = metric(
        "tok/s", True, "throughput", samples="prefill_tok_s_samples", budget=True, label="prefill tok/s"
    )  # prompt tokens x batch / forward time, median
    prefill_logits: str | None = None  # positions whose logits the timed prefill computes: last | all
    prefill_tok_s_iqr: float | None = None
    prefill_tok_s_samples: list[float] = field(default_factory=list)
    decode_tok_s: float | None = metric(
        "tok/s", True, "throughput", samples="decode_tok_s_samples", budget=True, label="decode tok/s"
    )  # new tokens x batch / decode time (after 1st token)
    decode_tok_s_iqr: float | None = None
    decode_tok_s_samples: list[float] = field(default_factory=list)
    decode_token_times_s: list[float] = field(default_factory=list)  # s, generate start to each new token, last repeat
    generate_tok_s: float | None = metric(
        "tok/s", True, "throughput", label="generate tok/s"
    )  # new tokens x batch / whole generate call
    ttft_s: float | None = metric(
        "s", False, "throughput", samples="ttft_s_samples", label="ttft s"
    )  # generate start to first new token, median
    ttft_s_samples: list[float] = field(default_factory=list)  # s, one per timed repeat
    token_latency_p50_s: float | None = None  # between consecutive new tokens
    token_latency_p90_s: float | None = None
    encode_samples_s: float | None = metric(
        "seq/s", True, "throughput", samples="encode_samples_s_samples", budget=True, label="encode seq/s"
    )  # encoders: sequences per second, median
    encode_samples_s_iqr: float | None = None
    encode_samples_s_samples: list[float] = field(default_factory=list)
    prefill_tok_s_ci_rel: float | None = None  # relative half-width of the median's 95 % CI (harness.stats)
    decode_tok_s_ci_rel: float | None = None
    encode_samples_s_ci_rel: float | None = None
    budget_limited: list[str] = field(default_factory=list)  # phases stopped by --time-budget before the CI target
    sweep: list[dict[str, Any]] = field(default_factory=list)  # other prompt/batch points
    # contention (harness.measure.contention): CPU that other processes used while timed phases ran
    contended: bool | None = None  # others used > 10 % of the machine's core-seconds in some timed phase
    contention: str | None = None  # one line with the numbers behind `contended`
    others_cpu_share_max: float | None = None  # largest share of the machine's CPU others took in one phase
    load_avg_1m_max: float | None = None  # largest 1-minute load average seen at a timed phase's end
    intra_op_threads: int | None = None  # the framework's intra-op threads (torch.get_num_threads)
    usable_cores: int | None = None  # CPUs in this worker's affinity mask
    contention_phases: list[dict[str, Any]] = field(default_factory=list)  # per timed phase: wall, own, others
    memory_bandwidth_bytes_s: float | None = None  # device copy bandwidth, once per run
    decode_roofline_tok_s: float | None = None  # bandwidth / weight_bytes (batch 1)
    decode_roofline_frac: float | None = metric(
        "frac", True, "throughput", label="roofline"
    )  # decode_tok_s / decode_roofline_tok_s
    load_bandwidth_bytes_s: float | None = None  # checkpoint_bytes / load_s

    # --- quality against the reference -------------------------------------------------------
    reference_precision: str | None = None
    reference_model: str | None = None  # the model the reference precision ran on (itself, or --reference-model)
    eval_tokens: int | None = (
        None  # tokens the quality pass compared (after harness.measure.quality.scaled_eval_tokens)
    )
    eval_tokens_requested: int | None = None  # --eval-tokens (cut to what the text and the reference hold)
    reference_eval_tokens: int | None = None  # tokens the reference's outputs cover (decided once per model, device)
    kl_mean: float | None = metric(
        "nats", False, "quality", budget=True, label="kl_mean"
    )  # mean per-token KL(reference || this), nats
    kl_mean_ci_low: float | None = None
    kl_mean_ci_high: float | None = None
    kl_p99: float | None = metric("nats", False, "quality", label="kl_p99")
    top1_agree: float | None = metric("frac", True, "quality", label="top1")
    ppl: float | None = None
    ppl_delta_frac: float | None = metric(
        "frac", False, "quality", budget=True, label="ppl_delta %"
    )  # (ppl - ppl_ref) / ppl_ref
    ppl_delta_frac_ci_low: float | None = None
    ppl_delta_frac_ci_high: float | None = None
    max_abs_logit_diff: float | None = metric("logit", False, "quality", label="max |logit diff|")
    greedy_match_frac: float | None = metric(
        "frac", True, "quality", label="greedy match"
    )  # mean matching prefix before the first divergence / greedy tokens
    greedy_token_agree: float | None = None  # share of greedy positions whose token equals the reference's
    greedy_tokens_generated: int | None = None  # new tokens per prompt the greedy pass produced
    greedy_first_diverge: list[int | None] = field(default_factory=list)  # per prompt
    embed_cosine_mean: float | None = metric("cosine", True, "quality", budget=True, label="cosine")
    embed_cosine_min: float | None = None
    rank_agree: float | None = metric(
        "spearman", True, "quality", label="rank agree"
    )  # Spearman of pair similarities vs the reference
    roundtrip_max_abs_diff: float | None = None  # outputs after save_pretrained -> from_pretrained
    roundtrip_live_max_abs_diff: float | None = None  # the live model's outputs after save_pretrained vs before
    roundtrip_reload_max_abs_diff: float | None = None  # the reloaded model's outputs vs the live one's after the save

    # --- fine-tuning (scenario "finetune", harness.measure.finetune): N optimizer steps on one fixed batch ---
    # Every field from here to the end belongs to the finetune scenario (training_fields below):
    # add inference fields above this section.
    lora_method: str | None = None  # plain (LoRA on the layers as loaded) | kbit (QLoRA) | full (no adapter)
    lora_rank: int | None = None  # 0: full fine-tuning
    lora_alpha: int | None = None  # as the framework applies it (peft: --lora-alpha; Keras: the rank)
    lora_targets: str | None = None  # which layers got adapters
    train_seq_len: int | None = None  # tokens per training sequence
    train_batch_size: int | None = None
    train_steps: int | None = None  # optimizer steps run; the first is the untimed warm-up
    learning_rate: float | None = None
    optimizer: str | None = None  # adamw | adamw8bit
    gradient_checkpointing: bool | None = None
    upcast_param_bytes: int | None = None  # bytes added by casting unquantized 16-bit params to fp32 (kbit prep)
    trainable_params: int | None = None  # peft's count of parameters that receive gradients
    all_params: int | None = None  # peft's count of all parameters (a packed 4-bit weight counts per element)
    trainable_param_bytes: int | None = None
    optimizer_state_bytes: int | None = None  # every optimizer state tensor after the last step, each storage once
    adapter_bytes: int | None = metric(
        "bytes", False, "finetune", label=f"adapter {MIB_LABEL}"
    )  # the saved adapter (adapter_model.safetensors), or the whole model's weights for full fine-tuning
    train_step_s: float | None = metric(
        "s", False, "finetune", samples="train_step_s_samples", budget=True, label="step s"
    )  # forward + backward + optimizer step, synchronized, median over the timed steps
    train_step_s_samples: list[float] = field(default_factory=list)
    train_step_s_iqr: float | None = None
    train_step_s_ci_rel: float | None = None  # relative half-width of the median's 95 % CI
    train_first_step_s: float | None = None  # the warm-up step (allocations, optimizer state creation)
    train_forward_s: float | None = None  # medians of each phase over the timed steps
    train_backward_s: float | None = None
    train_optimizer_s: float | None = None
    train_tok_s: float | None = metric(
        "tok/s", True, "finetune", samples="train_tok_s_samples", budget=True, label="train tok/s"
    )  # train_seq_len x train_batch_size / step time, median
    train_tok_s_samples: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)  # the training loss at every step (the same batch)
    loss_first: float | None = None
    loss_last: float | None = None
    loss_drop_frac: float | None = metric("frac", True, "finetune", label="loss drop")  # (first - last) / first
    grad_nonzero_frac: float | None = None  # share of trainable tensors whose gradient was non-zero in some step
    peak_rss_train_forward_bytes: int | None = None  # high-water mark over the training forwards (every step)
    peak_rss_anon_train_forward_bytes: int | None = None
    peak_rss_train_backward_bytes: int | None = None
    peak_rss_anon_train_backward_bytes: int | None = None
    peak_rss_train_optimizer_bytes: int | None = None
    peak_rss_anon_train_optimizer_bytes: int | None = None
    peak_device_allocated_train_forward_bytes: int | None = None
    peak_device_allocated_train_backward_bytes: int | None = None
    peak_device_allocated_train_optimizer_bytes: int | None = None
    peak_device_reserved_train_bytes: int | None = None  # allocator reserved pool at its largest over training
    train_peak_bytes: int | None = metric(
        "bytes", False, "finetune", budget=True, label=f"train peak {MIB_LABEL}"
    )  # the largest training phase's peak above rss_before_load (host) or the allocator's peak (cuda)
    train_peak_phase: str | None = None
    predicted_train_forward_bytes: int | None = None  # the training plan (harness.plan.trainplan), before any load,
    predicted_train_backward_bytes: int | None = None  # above the worker's baseline: weights, adapter, grads,
    predicted_train_optimizer_bytes: int | None = None  # optimizer states, saved activations and temporaries
    adapter_roundtrip_kl: float | None = metric(
        "nats", False, "finetune", label="adapter KL"
    )  # mean per-token KL(trained model || adapter saved and reloaded on a fresh base, same precision)
    adapter_roundtrip_max_abs_diff: float | None = None
    merged_kl: float | None = None  # KL(trained model || adapter merged into the reloaded base's weights)
    merged_max_abs_diff: float | None = None

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


METRICS: Mapping[str, Metric] = MappingProxyType(
    {f.name: f.metadata["metric"] for f in fields(Record) if "metric" in f.metadata}
)
SAMPLED_METRICS: Mapping[str, Metric] = MappingProxyType({n: m for n, m in METRICS.items() if m.samples})


def training_fields() -> tuple[str, ...]:
    """Record fields only the finetune scenario measures (the Record section after roundtrip_max_abs_diff)."""
    names = Record.field_names()
    return tuple(names[names.index("lora_method") :])


def na(record_fields: dict[str, Any], reasons: dict[str, str], reason: str, *names: str) -> None:
    """Mark `names` as not applicable: null value, with `reason` recorded."""
    for name in names:
        record_fields[name] = None
        reasons[name] = reason
