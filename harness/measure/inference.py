"""Scenarios: what is measured in a worker once a backend exists. Each returns record fields."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import Backend
from harness.measure.trackers import PhaseMeter, PhaseResult, Timer, proc_status
from harness.records import TRAIN_PHASES
from harness.workload import FIRST_FORWARD_TOKENS


def release_load_leftovers(backend: Any) -> None:
    """Quantized precisions: drop from RSS the checkpoint pages the quantizer read while loading, which
    stay file-backed in RSS while the file is still mapped (harness.measure.pagecache.release_mappings keeps
    them in the page cache, so the next warm load stays warm). Float precisions are left alone: there
    the mapped pages are the weights themselves."""
    from harness.checkpoint import weight_files
    from harness.measure.pagecache import release_mappings
    from harness.registry import PRECISIONS

    precision = PRECISIONS.get(backend.spec.precision)
    if precision is None or not precision.quantized or not Path(backend.spec.source).is_dir():
        return
    with contextlib.suppress(OSError):  # a weight file gone, or no /proc: nothing to release
        release_mappings(weight_files(backend.spec.source, backend.spec.allow_pickle))


def page_cache_residency(backend: Any) -> float | None:
    """Share of the pages of the files the load reads that are in the page cache now (mincore), None
    where there are no local files or they cannot be mapped."""
    from harness.measure.pagecache import resident_fraction

    try:
        files = loaded_files(backend)
        return resident_fraction(files) if files else None
    except OSError:
        return None


def loaded_files(backend: Any) -> list[Path]:
    """The files the backend's load reads, after prepare(): the backend's own `weight_files()` where it
    has one (llama.cpp: the GGUF file it made), else the checkpoint's weight files, exactly those
    from_pretrained reads (none for a source that is not a local directory)."""
    from harness.checkpoint import weight_files

    own = getattr(backend, "weight_files", None)
    if own is not None:
        return [Path(p) for p in own()]
    if not Path(backend.spec.source).is_dir():
        return []
    return [Path(p) for p in weight_files(backend.spec.source, backend.spec.allow_pickle)]


def checkpoint_bytes(backend: Any) -> int | None:
    """Bytes of exactly the files the backend's load reads (`loaded_files`); None where there are none."""
    return sum(p.stat().st_size for p in loaded_files(backend)) or None


def first_input(kind: str, vocab_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A fixed 16-token batch-1 input taken from the evaluation text."""
    ids = vocab_ids[:FIRST_FORWARD_TOKENS][None, :]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def run_forward(backend: Backend, kind: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    if kind == "causal-lm":
        return backend.logits(batch["input_ids"])
    return backend.embed(batch["input_ids"], batch["attention_mask"])


def measure_load(
    backend: Backend,
    kind: str,
    eval_ids: np.ndarray,
    before_load: Callable[[], None] | None = None,
    first_forward: bool = True,
) -> dict[str, Any]:
    """Load the model and run the first forward; time both, each its own memory/contention phase.

    `before_load` runs right before the timed load, after imports and device set-up (the cold load
    drops the checkpoint's pages there); then the checkpoint's page-cache residency is read
    (page_cache_resident_frac_before_load), so every load says whether it started warm.
    `first_forward=False` (the finetune scenario) stops after the load: an eval-mode forward would
    repack bitsandbytes' 4-bit weights on AVX512-BF16 CPUs into a layout that does not train. The
    phase results are in fields["_phases"], for measure_after_load's headline; the worker removes the key.
    """
    fields: dict[str, Any] = dict(backend.prepare())  # quantizer import and CUDA context: outside load_s
    if before_load is not None:
        before_load()
    # what this load starts from: ~1.0 for a warm load, ~0.0 after the cold load's drop
    fields["page_cache_resident_frac_before_load"] = page_cache_residency(backend)
    with PhaseMeter("load", backend, timed=True) as load_phase:
        with Timer(backend.synchronize) as load_timer:
            backend.load()
    status = proc_status()
    release_load_leftovers(backend)
    phases = [load_phase]
    if first_forward:
        with PhaseMeter("first_forward", backend, timed=True) as forward_phase:
            with Timer(backend.synchronize) as forward_timer:
                output = run_forward(backend, kind, first_input(kind, eval_ids))
        if not np.isfinite(output).all():
            raise FloatingPointError("the first forward pass produced non-finite outputs")
        fields["first_forward_max_abs"] = float(np.abs(output).max())
        fields["first_forward_s"] = forward_timer.elapsed_s
        phases.append(forward_phase)
    else:
        reason = "no eval-mode first forward in the finetune scenario (it would repack 4-bit weights for inference)"
        fields.update(first_forward_max_abs=None, first_forward_s=None)
        fields["na_reasons"] = {"first_forward_max_abs": reason, "first_forward_s": reason}
    stats = backend.weight_stats()
    fields.update(
        load_s=load_timer.elapsed_s,
        rss_before_load_bytes=load_phase.result.host.before_bytes,
        peak_rss_bytes=max(p.result.host.peak_rss_bytes for p in phases),
        peak_rss_anon_bytes=max(p.result.host.peak_rss_anon_bytes for p in phases),
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
        weight_notes=dict(stats.notes),
        checkpoint_bytes=checkpoint_bytes(backend),
    )
    device = backend.device_memory()  # allocator peaks over load + first forward: the larger phase's
    peaks = [p.result.device_peak_bytes for p in phases if p.result.device_peak_bytes is not None]
    if peaks:
        device["peak_device_allocated_bytes"] = max(peaks)
    fields.update(device)
    fields["_phases"] = [p.result for p in phases]
    return fields


PHASES = ("load", "first_forward", "prefill", "decode", "encode", "quality", *TRAIN_PHASES)
ROUNDTRIP_PARTS = ("roundtrip_live_max_abs_diff", "roundtrip_reload_max_abs_diff")  # set by backends that split it


def intra_op_threads() -> int | None:
    """The framework's intra-op thread count (PyTorch workers), else None."""
    import sys

    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    return None


def phase_fields(phases: list[PhaseResult], device: str, reasons: dict[str, str]) -> dict[str, Any]:
    """Per-phase peaks, the headline peak_memory_bytes, and contention, from the phases that ran.

    Phases that did not run get null fields with a reason. The headline is the largest host peak RSS
    over every phase on the host (cpu), the largest allocator peak on a GPU (where the allocator
    reports one; else the host's, and peak_memory_phase says "host:<phase>").
    """
    from harness.measure.contention import contention_fields

    out: dict[str, Any] = {}
    ran = _largest_per_phase(phases)
    for name in PHASES:
        phase = ran.get(name)
        device_name = f"peak_device_allocated_{name}_bytes"
        host_names = (f"peak_rss_{name}_bytes", f"peak_rss_anon_{name}_bytes")
        if phase is None:
            for field_name in (device_name, *host_names):
                out[field_name] = None
                reasons.setdefault(field_name, f"the {name.replace('_', ' ')} phase did not run in this worker")
            continue
        out[host_names[0]] = phase.host.peak_rss_bytes
        out[host_names[1]] = phase.host.peak_rss_anon_bytes
        out[device_name] = phase.device_peak_bytes
        if phase.device_peak_bytes is None:
            reasons[device_name] = (
                "cpu: the host is the device; see peak_rss_*"
                if device == "cpu"
                else "the device reports no allocator peak"
            )
    host_peak = max(ran.values(), key=lambda p: p.host.peak_rss_bytes)
    device_phases = [p for p in ran.values() if p.device_peak_bytes is not None]
    if device != "cpu" and device_phases:
        top = max(device_phases, key=lambda p: p.device_peak_bytes or 0)
        out.update(peak_memory_bytes=top.device_peak_bytes, peak_memory_phase=top.name)
    else:
        prefix = "" if device == "cpu" else "host:"
        out.update(peak_memory_bytes=host_peak.host.peak_rss_bytes, peak_memory_phase=prefix + host_peak.name)
    out["peak_rss_method"] = "clear_refs" if all(p.host.hwm_reset for p in phases) else "sampled"
    loads = [p.load for p in phases if p.load is not None]
    out.update(contention_fields(loads, intra_op_threads()))
    if out["intra_op_threads"] is None:
        reasons["intra_op_threads"] = "not a PyTorch worker: the framework's thread count is not read"
    return out


def _largest_per_phase(phases: list[PhaseResult]) -> dict[str, PhaseResult]:
    """One result per phase name: the largest host and device peaks over every time that phase ran
    (the finetune scenario runs its three phases once per step)."""
    merged: dict[str, PhaseResult] = {}
    for phase in phases:
        seen = merged.get(phase.name)
        if seen is None:
            merged[phase.name] = phase
            continue
        host = seen.host if seen.host.peak_rss_bytes >= phase.host.peak_rss_bytes else phase.host
        anon = max(seen.host.peak_rss_anon_bytes, phase.host.peak_rss_anon_bytes)
        devices = [p for p in (seen.device_peak_bytes, phase.device_peak_bytes) if p is not None]
        merged[phase.name] = PhaseResult(
            phase.name,
            replace(host, peak_rss_anon_bytes=anon, hwm_reset=seen.host.hwm_reset and phase.host.hwm_reset),
            max(devices) if devices else None,
        )
    return merged


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
    """Throughput, roofline, quality and the round trip for a loaded model (job: harness.run.worker.WorkerJob).

    `no_quality_reason`: why quality cannot be measured (e.g. the model has no tokenizer).
    """
    fields: dict[str, Any] = {"model_kind": backend.spec.kind}
    reasons: dict[str, str] = {}
    phases: list[PhaseResult] = list(loaded.get("_phases", []))
    _throughput(backend, job, eval_ids, loaded, phases, fields, reasons)
    _quality(backend, job, eval_ids, loaded, no_quality_reason, phases, fields, reasons)
    _roundtrip(backend, job.options.roundtrip, eval_ids, fields, reasons)
    fields.update(phase_fields(phases, backend.spec.device, reasons))
    fields["budget_limited"] = list(fields.get("budget_limited", []))
    fields["device_process_end_bytes"] = backend.device_memory().get("device_process_bytes")
    if fields["device_process_end_bytes"] is None:
        reasons["device_process_end_bytes"] = (
            "cpu: the host is the device; see the host memory fields" if backend.spec.device == "cpu" else
            "NVML lists no process with this worker's pid, or NVML is unavailable"
        )  # fmt: skip
    fields["na_reasons"] = reasons
    return fields


def _throughput(backend: Backend, job: Any, eval_ids: np.ndarray, loaded: dict[str, Any],
                phases: list[PhaseResult], fields: dict[str, Any], reasons: dict[str, str]) -> None:  # fmt: skip
    """Prefill/decode (causal LMs) or encode (encoders) rates with their CIs, and the decode roofline."""
    from harness.measure.throughput import measure_throughput
    from harness.records import na

    options, kind = job.options, backend.spec.kind
    decode_fields = ("decode_tok_s", "decode_tok_s_iqr", "generate_tok_s", "ttft_s", "token_latency_p50_s",
                     "token_latency_p90_s", "prefill_tok_s", "prefill_tok_s_iqr", "decode_roofline_frac", "new_tokens", "prefill_logits")  # fmt: skip
    if kind == "causal-lm":
        na(fields, reasons, "encoder metric; this model is a causal LM", "encode_samples_s", "encode_samples_s_iqr")
    else:
        na(fields, reasons, "encoders do not generate: no prefill/decode", *decode_fields)
    if options.throughput:
        fields.update(measure_throughput(backend, kind, eval_ids, options, phases))
        if kind == "causal-lm":
            fields["prefill_logits"] = backend.prefill_logits
    else:
        na(fields, reasons, "throughput disabled (--no-throughput)", *decode_fields, "encode_samples_s",
           "encode_samples_s_iqr", "prompt_length", "batch_size", "memory_bandwidth_bytes_s", "decode_roofline_tok_s")  # fmt: skip
    rate_ci = ("prefill_tok_s_ci_rel", "decode_tok_s_ci_rel") if kind == "causal-lm" else ("encode_samples_s_ci_rel",)
    for name in ("prefill_tok_s_ci_rel", "decode_tok_s_ci_rel", "encode_samples_s_ci_rel"):
        if fields.get(name) is None:
            reason = "fewer than 2 samples (or 1 new token): no CI" if name in rate_ci else "not this kind's metric"
            na(fields, reasons, reasons.get(name.replace("_ci_rel", ""), reason), name)
    fields.update(roofline_fields(loaded | fields, job.memory_bandwidth_bytes_s))
    if kind != "causal-lm":
        na(fields, reasons, "encoders do not generate: no decode roofline", "decode_roofline_frac")


def _quality(backend: Backend, job: Any, eval_ids: np.ndarray, loaded: dict[str, Any], no_quality_reason: str | None,
             phases: list[PhaseResult], fields: dict[str, Any], reasons: dict[str, str]) -> None:  # fmt: skip
    """The comparison with the reference (or writing it, for the reference itself), in its own phase."""
    from harness.measure.quality import CAUSAL_FIELDS, ENCODER_FIELDS, measure_quality
    from harness.records import na

    options, kind = job.options, backend.spec.kind
    quality_phase = ("peak_rss_quality_bytes", "peak_rss_anon_quality_bytes", "peak_device_allocated_quality_bytes")
    every_field = (*CAUSAL_FIELDS, *ENCODER_FIELDS, "eval_tokens", "eval_tokens_requested", "reference_precision",
                   *quality_phase)  # fmt: skip
    if not options.quality or no_quality_reason:
        na(fields, reasons, no_quality_reason or "quality disabled (--no-quality)", *every_field)
        return
    if kind == "causal-lm":
        na(fields, reasons, "embedding metric; this model is a causal LM", *ENCODER_FIELDS)
    else:
        na(fields, reasons, "token-level metric; this model is an encoder", *CAUSAL_FIELDS, "eval_tokens",
           "eval_tokens_requested")  # fmt: skip
    if job.reference_path is None and job.write_reference_path is None:
        na(fields, reasons, job.reference_note or "no reference output for this model and device", *every_field)
        return
    forward_tok_s = fields.get("prefill_tok_s") or FIRST_FORWARD_TOKENS / max(loaded["first_forward_s"], 1e-9)
    with PhaseMeter("quality", backend) as meter:
        quality = measure_quality(backend, kind, eval_ids, options, job.reference_path, job.write_reference_path,
                                  job.model.tokenizer, forward_tok_s)  # fmt: skip
    phases.append(meter.result)
    fields.update(quality)
    for name in quality:
        reasons.pop(name, None)


def _roundtrip(backend: Backend, requested: bool, eval_ids: np.ndarray, fields: dict[str, Any],
               reasons: dict[str, str]) -> None:  # fmt: skip
    """save -> load -> compare outputs (--roundtrip), with its parts where the backend times them."""
    from harness.records import na

    roundtrip_fields = ("roundtrip_max_abs_diff", *ROUNDTRIP_PARTS)
    if not requested:
        na(fields, reasons, "round trip not requested (--roundtrip)", *roundtrip_fields)
        return
    batch = first_input(backend.spec.kind, eval_ids)
    try:
        fields["roundtrip_max_abs_diff"] = backend.roundtrip_max_abs_diff(batch["input_ids"], batch["attention_mask"])
    except NotImplementedError as exc:
        na(fields, reasons, f"not serializable: {exc}", *roundtrip_fields)
        return
    parts = getattr(backend, "roundtrip_parts", {})
    for name in ROUNDTRIP_PARTS:
        fields[name] = parts.get(name)
        if fields[name] is None:
            reasons[name] = f"the {backend.framework} backend measures only the whole round trip"
