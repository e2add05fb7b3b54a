"""Scenarios: what is measured in a worker once a backend exists. Each returns record fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import Backend
from harness.trackers import HostMemoryTracker, Timer, proc_status

FIRST_FORWARD_TOKENS = 16


def checkpoint_bytes(source: str, allow_pickle: bool = False) -> int | None:
    """Bytes of exactly the weight files from_pretrained reads (a hub id is resolved to its local snapshot first)."""
    from harness.models import weight_files

    if not Path(source).is_dir():
        return None
    return sum(p.stat().st_size for p in weight_files(source, allow_pickle)) or None


def first_input(kind: str, vocab_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A fixed 16-token batch-1 input taken from the evaluation text."""
    ids = vocab_ids[:FIRST_FORWARD_TOKENS][None, :]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def run_forward(backend: Backend, kind: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    if kind == "causal-lm":
        return backend.logits(batch["input_ids"])
    return backend.embed(batch["input_ids"], batch["attention_mask"])


def measure_load(backend: Backend, kind: str, eval_ids: np.ndarray) -> dict[str, Any]:
    """Load the model and run the first forward; time both and track memory over both."""
    fields: dict[str, Any] = dict(backend.prepare())  # quantizer import and CUDA context: outside load_s
    backend.reset_device_peaks()
    with HostMemoryTracker() as memory:
        with Timer(backend.synchronize) as load_timer:
            backend.load()
        status = proc_status()  # the tracker keeps running through the first forward
        with Timer(backend.synchronize) as forward_timer:
            output = run_forward(backend, kind, first_input(kind, eval_ids))
    if not np.isfinite(output).all():
        raise FloatingPointError("the first forward pass produced non-finite outputs")
    fields["first_forward_max_abs"] = float(np.abs(output).max())
    stats = backend.weight_stats()
    fields.update(
        load_s=load_timer.elapsed_s,
        first_forward_s=forward_timer.elapsed_s,
        rss_before_load_bytes=memory.result.before_bytes,
        peak_rss_bytes=memory.result.peak_rss_bytes,
        peak_rss_anon_bytes=memory.result.peak_rss_anon_bytes,
        rss_after_load_bytes=status["VmRSS"],
        rss_anon_bytes=status["RssAnon"],
        rss_file_bytes=status["RssFile"],
        rss_shmem_bytes=status["RssShmem"],
        weight_bytes=stats.weight_bytes,
        param_count=stats.param_count,
        quant_state_bytes=stats.quant_state_bytes,
        quantized_modules=stats.quantized_modules,
        quantized_param_frac=stats.quantized_param_frac,
        storage_dtype=stats.storage_dtype,
        compute_dtype=stats.compute_dtype,
        architecture=stats.architecture,
        quant_state_device=stats.quant_state_device,
        checkpoint_bytes=checkpoint_bytes(backend.spec.source, backend.spec.allow_pickle),
    )
    fields.update(backend.device_memory())
    return fields


def roofline_fields(fields: dict[str, Any], bandwidth_bytes_s: float | None) -> dict[str, Any]:
    """Decode roofline (bandwidth / weight bytes, batch 1) and load bandwidth."""
    out: dict[str, Any] = {"memory_bandwidth_bytes_s": bandwidth_bytes_s}
    if fields.get("load_s") and fields.get("checkpoint_bytes"):
        out["load_bandwidth_bytes_s"] = fields["checkpoint_bytes"] / fields["load_s"]
    if bandwidth_bytes_s and fields.get("weight_bytes"):
        out["decode_roofline_tok_s"] = bandwidth_bytes_s / fields["weight_bytes"]
        if fields.get("decode_tok_s"):
            steps_per_s = fields["decode_tok_s"] / (fields.get("batch_size") or 1)
            out["decode_roofline_frac"] = steps_per_s / out["decode_roofline_tok_s"]
    return out


def measure_after_load(
    backend: Backend, job: Any, eval_ids: np.ndarray, loaded: dict[str, Any], no_quality_reason: str | None = None
) -> dict[str, Any]:
    """Throughput, roofline and quality for a loaded model (job: harness.worker.WorkerJob).

    `no_quality_reason`: why quality cannot be measured (e.g. the model has no tokenizer).
    """
    from harness.quality import CAUSAL_FIELDS, ENCODER_FIELDS, measure_quality
    from harness.records import na
    from harness.throughput import measure_throughput

    options, kind = job.options, backend.spec.kind
    fields: dict[str, Any] = {"model_kind": kind}
    reasons: dict[str, str] = {}
    decode_fields = ("decode_tok_s", "decode_tok_s_iqr", "generate_tok_s", "ttft_s", "token_latency_p50_s",
                     "token_latency_p90_s", "prefill_tok_s", "prefill_tok_s_iqr", "decode_roofline_frac", "new_tokens", "prefill_logits")  # fmt: skip
    if kind == "causal-lm":
        na(fields, reasons, "encoder metric; this model is a causal LM", "encode_samples_s", "encode_samples_s_iqr")
    else:
        na(fields, reasons, "encoders do not generate: no prefill/decode", *decode_fields)
    if options.throughput:
        fields.update(measure_throughput(backend, kind, eval_ids, options))
        if kind == "causal-lm":
            fields["prefill_logits"] = backend.prefill_logits
    else:
        na(fields, reasons, "throughput disabled (--no-throughput)", *decode_fields, "encode_samples_s",
           "encode_samples_s_iqr", "prompt_length", "batch_size", "memory_bandwidth_bytes_s", "decode_roofline_tok_s")  # fmt: skip
    fields.update(roofline_fields(loaded | fields, job.memory_bandwidth_bytes_s))
    if kind != "causal-lm":
        na(fields, reasons, "encoders do not generate: no decode roofline", "decode_roofline_frac")
    quality_phase = ("peak_rss_quality_bytes", "peak_rss_anon_quality_bytes")
    if not options.quality or no_quality_reason:
        reason = no_quality_reason or "quality disabled (--no-quality)"
        na(
            fields,
            reasons,
            reason,
            *CAUSAL_FIELDS,
            *ENCODER_FIELDS,
            "eval_tokens",
            "reference_precision",
            *quality_phase,
        )
    else:
        if kind == "causal-lm":
            na(fields, reasons, "embedding metric; this model is a causal LM", *ENCODER_FIELDS)
        else:
            na(fields, reasons, "token-level metric; this model is an encoder", *CAUSAL_FIELDS, "eval_tokens")
        if job.reference_path is None and job.write_reference_path is None:
            note = job.reference_note or "no reference output for this model and device"
            na(fields, reasons, note, *CAUSAL_FIELDS, *ENCODER_FIELDS, "eval_tokens", "reference_precision")
        else:
            with HostMemoryTracker() as memory:
                quality = measure_quality(backend, kind, eval_ids, options, job.reference_path,
                                          job.write_reference_path, job.model.tokenizer)  # fmt: skip
            quality.update(peak_rss_quality_bytes=memory.result.peak_rss_bytes,
                           peak_rss_anon_quality_bytes=memory.result.peak_rss_anon_bytes)  # fmt: skip
            fields.update(quality)
            for name in quality:
                reasons.pop(name, None)
    if options.roundtrip:
        batch = first_input(kind, eval_ids)
        try:
            fields["roundtrip_max_abs_diff"] = backend.roundtrip_max_abs_diff(
                batch["input_ids"], batch["attention_mask"]
            )
        except NotImplementedError as exc:
            na(fields, reasons, f"not serializable: {exc}", "roundtrip_max_abs_diff")
    else:
        na(fields, reasons, "round trip not requested (--roundtrip)", "roundtrip_max_abs_diff")
    fields["na_reasons"] = reasons
    return fields
