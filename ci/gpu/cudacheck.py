"""Checks on the records of a CUDA run: memory, dtypes, bitsandbytes kernels, roofline, outcomes, contexts.

    python ci/gpu/cudacheck.py RUN_DIR [--nvml-log FILE] [--require-cuda] [--expect-oom]

Reads a run dir (results.jsonl, environment.json, and what ci/gpu/run.sh adds beside them:
`model-configs/<model dir name>.json`, `nvml.jsonl`, `profile/summary.json`) and prints one line per
check, PASS / FAIL / SKIP with its numbers, the problems of a FAIL indented below it, then the
numbers of the 1.1B Llama beside FACTS' H100 anchors. Exit code 1 on any FAIL. Every check is a
function over plain record dicts that returns its problems as strings (as harness.checks does),
so it runs on the CPU machine over a run dir copied back from the GPU. A CI script, not part of
the harness's wheel: it imports the harness from the repository root it sits in.

SKIP means nothing to check (e.g. no CUDA record in a CPU run); `--require-cuda` makes a run
without ok CUDA records, or without an NVML log, a FAIL. `--expect-oom` is for the run made with
a small `--memory-limit`: every record must be an `oom` failure from the CUDA allocator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: the tree's harness

from harness.plan.memplan import DTYPE_BYTES, kv_cache_bytes
from harness.registry import PRECISIONS
from harness.storage import read_records
from harness.workload import FIRST_FORWARD_TOKENS

BNB_PRECISIONS = tuple(p.name for p in PRECISIONS.values() if p.family == "bitsandbytes")
PEAK_TOLERANCE = 0.10  # peak allocated within 10 % of weights + KV + first-forward outputs
# cuBLAS and cuBLASLt workspaces come from PyTorch's caching allocator, so they count in
# max_memory_allocated: 32 MiB each on compute capability 9.0 in torch 2.x (8.1 MiB elsewhere).
# A fixed sum, so it is an allowance, not a percentage: it dwarfs a 3M-parameter model.
WORKSPACE_ALLOWANCE_BYTES = 64 << 20
NVML_LOG = "nvml.jsonl"
MODEL_CONFIGS = "model-configs"
PROFILE_SUMMARY = Path("profile") / "summary.json"
BAD_ROLES = ("forkserver", "other", "resource-tracker")
# FACTS.md, "One GPU, measured": 1.10B Llama (TinyLlama-1.1B shape), random bf16 weights, H100 80GB HBM3,
# torch 2.11+cu130, transformers 5.17, bitsandbytes 0.50.2; one run each; plain generate at batch 1.
ANCHORS_H100: dict[str, tuple[float, float]] = {  # precision: (from_pretrained load s, decode tok/s bs1)
    "bf16": (0.99, 16.9), "fp16": (1.10, 16.0), "fp32": (1.43, 46.2), "int8": (7.60, 5.9),
    "nf4": (5.14, 11.0), "nf4-dq": (4.28, 16.3), "fp4": (5.18, 14.0),
}  # fmt: skip
ANCHOR_RAW_READ_S = (0.34, 0.40)  # the same safetensors read straight to the GPU
ANCHOR_BF16_FLOOR_FRAC = 0.012  # bf16 decode at batch 1 against the copy-bandwidth floor
ANCHOR_PARAMS = (0.9e9, 1.3e9)  # a record is the 1B-class model when its param_count is in this range


@dataclass(frozen=True)
class Check:
    """One check's verdict: problems (empty when it holds), how many items it examined, its numbers."""

    name: str
    problems: list[str]
    checked: int
    detail: str = ""

    @property
    def status(self) -> str:
        if self.problems:
            return "FAIL"
        return "PASS" if self.checked else "SKIP"

    def lines(self, limit: int = 12) -> list[str]:
        out = [f"{self.status} {self.name}: {self.detail}"]
        out += [f"    - {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"    - ... and {len(self.problems) - limit} more")
        return out


@dataclass(frozen=True)
class NvmlLog:
    """What nvml_sampler.py wrote: its header and the samples."""

    header: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


# --- small helpers ----------------------------------------------------------------------------


def label(record: dict[str, Any]) -> str:
    return f"{Path(record['model']).name}-{record['precision']}-{record['device']}"


def is_cuda(record: dict[str, Any]) -> bool:
    return str(record.get("device", "")).startswith("cuda")


def ok_cuda(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok" and is_cuda(r)]


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.3f} GB"


def _missing_field(records: list[dict[str, Any]], name: str) -> str | None:
    """A problem when the record schema lacks `name` (read_records keeps schema fields only)."""
    if records and name not in records[0]:
        return f"the records have no '{name}' field (harness.records.Record lacks it)"
    return None


class ConfigView:
    """Attribute access to a config.json dict, the way harness.plan.memplan reads a transformers config
    (GPT-2's n_layer / n_head / n_embd answer to the standard names)."""

    ALIASES: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "hidden_size": "n_embd",
    }

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__["_data"]
        if name in data:
            return data[name]
        if name in self.ALIASES and self.ALIASES[name] in data:
            return data[self.ALIASES[name]]
        raise AttributeError(name)


def first_forward_bytes(record: dict[str, Any], config: dict[str, Any]) -> tuple[int, int]:
    """(KV bytes, output bytes) of the first forward that load's peak covers: FIRST_FORWARD_TOKENS
    tokens at batch 1. KV through harness.plan.memplan.kv_cache_bytes at the storage dtype (where hidden
    states live); outputs: the logits (encoders: last hidden state) plus the float32 copy the
    worker makes of them."""
    view = ConfigView(config)
    dtype = record.get("storage_dtype") or "float32"
    kv = kv_cache_bytes(view, config, FIRST_FORWARD_TOKENS, 0, 1, dtype)
    width = view.hidden_size if record.get("model_kind") == "encoder" else view.vocab_size
    per_value = DTYPE_BYTES[dtype] + (4 if dtype != "float32" else 0)
    return kv, FIRST_FORWARD_TOKENS * int(width) * per_value


def load_model_configs(records: list[dict[str, Any]], run_dir: Path) -> dict[str, dict[str, Any] | None]:
    """config.json per model: the copy run.sh keeps in the run dir, else the model_source dir here."""
    configs: dict[str, dict[str, Any] | None] = {}
    for record in records:
        model, source = record["model"], record.get("model_source")
        if model in configs:
            continue
        candidates = []
        if source:
            candidates.append(run_dir / MODEL_CONFIGS / f"{Path(source).name}.json")
            candidates.append(Path(source) / "config.json")
        candidates.append(run_dir / MODEL_CONFIGS / f"{Path(model).name}.json")
        configs[model] = next((json.loads(p.read_text()) for p in candidates if p.is_file()), None)
    return configs


def read_nvml_log(path: Path) -> NvmlLog:
    header: dict[str, Any] = {}
    samples = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        data = json.loads(line)
        if "header" in data:
            header = data["header"]
        else:
            samples.append(data)
    return NvmlLog(header, samples)


# --- the checks -------------------------------------------------------------------------------


def outcome_problems(records: list[dict[str, Any]]) -> list[str]:
    """Every combination ran (ok) or was skipped with its reason."""
    problems = []
    for record in records:
        if record["status"] == "failed":
            problems.append(f"{label(record)} failed ({record.get('error_kind')}): {record.get('error')}")
        elif record["status"] == "skipped" and not (record.get("skip_reason") or "").strip():
            problems.append(f"{label(record)} skipped without a reason")
    return problems


def check_outcomes(records: list[dict[str, Any]]) -> Check:
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    detail = f"{len(records)} records: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed"
    return Check("outcomes", outcome_problems(records), len(records), detail)


def device_peak_problems(
    records: list[dict[str, Any]], configs: dict[str, dict[str, Any] | None], ratios: list[float] | None = None
) -> list[str]:
    """weight_bytes <= peak allocated <= (1 + 10 %) x (weights + first-forward KV + outputs) + workspaces."""
    problems = []
    for record in ok_cuda(records):
        peak, weights = record.get("peak_device_allocated_bytes"), record.get("weight_bytes")
        if peak is None or weights is None:
            problems.append(f"{label(record)}: peak_device_allocated_bytes={peak}, weight_bytes={weights}")
            continue
        config = configs.get(record["model"])
        if config is None:
            problems.append(f"{label(record)}: no config.json to compute the KV cache and logits from")
            continue
        kv, outputs = first_forward_bytes(record, config)
        expected = weights + kv + outputs
        if ratios is not None:
            ratios.append(peak / expected)
        ceiling = (1 + PEAK_TOLERANCE) * expected + WORKSPACE_ALLOWANCE_BYTES
        if peak < weights:
            problems.append(f"{label(record)}: peak allocated {_gb(peak)} < weight_bytes {_gb(weights)}")
        elif peak > ceiling:
            problems.append(
                f"{label(record)}: peak allocated {_gb(peak)} = {peak / expected:.3f} x expected {_gb(expected)} "
                f"(weights {_gb(weights)} + KV {_gb(kv)} + outputs {_gb(outputs)}), over +10 % + "
                f"{WORKSPACE_ALLOWANCE_BYTES >> 20} MiB workspaces"
            )
    return problems


def check_device_peak(records: list[dict[str, Any]], configs: dict[str, dict[str, Any] | None]) -> Check:
    ratios: list[float] = []
    problems = device_peak_problems(records, configs, ratios)
    detail = f"{len(ok_cuda(records))} ok CUDA records"
    if ratios:
        detail += f", peak / (weights + KV + outputs) from {min(ratios):.3f} to {max(ratios):.3f}"
    return Check("device-peak", problems, len(ok_cuda(records)), detail)


def nvml_reserved_problems(records: list[dict[str, Any]]) -> list[str]:
    """NVML's bytes for the worker >= the allocator's reserved bytes, or null with its reason."""
    problems = []
    for record in ok_cuda(records):
        nvml, reserved = record.get("device_process_bytes"), record.get("peak_device_reserved_bytes")
        if nvml is None:
            if not record.get("na_reasons", {}).get("device_process_bytes"):
                problems.append(f"{label(record)}: device_process_bytes is null without a reason")
        elif reserved is None or nvml < reserved:
            problems.append(f"{label(record)}: NVML {_gb(nvml)} < allocator reserved {_gb(reserved)}")
    return problems


def check_nvml_reserved(records: list[dict[str, Any]]) -> Check:
    cuda = ok_cuda(records)
    measured = [r for r in cuda if r.get("device_process_bytes") is not None and r.get("peak_device_reserved_bytes")]
    detail = f"{len(cuda)} ok CUDA records, {len(measured)} with NVML bytes, {len(cuda) - len(measured)} null"
    if measured:
        overhead = [r["device_process_bytes"] - r["peak_device_reserved_bytes"] for r in measured]
        detail += f"; NVML - reserved from {min(overhead) / 2**20:.0f} to {max(overhead) / 2**20:.0f} MiB (context)"
    nulls = {r["na_reasons"].get("device_process_bytes") for r in cuda if r.get("device_process_bytes") is None}
    if nulls - {None}:
        detail += f"; null because: {'; '.join(sorted(nulls - {None}))}"
    return Check("nvml-vs-reserved", nvml_reserved_problems(records), len(cuda), detail)


def bf16_problems(records: list[dict[str, Any]]) -> list[str]:
    """bf16 combinations store and compute in bfloat16 (any device)."""
    problems = []
    for record in records:
        if record["status"] == "ok" and record["precision"] == "bf16":
            dtypes = (record.get("storage_dtype"), record.get("compute_dtype"))
            if dtypes != ("bfloat16", "bfloat16"):
                problems.append(f"{label(record)}: storage/compute dtype {dtypes[0]}/{dtypes[1]}, not bfloat16")
    return problems


def check_bf16(records: list[dict[str, Any]]) -> Check:
    bf16 = [r for r in records if r["status"] == "ok" and r["precision"] == "bf16"]
    return Check("bf16-dtype", bf16_problems(records), len(bf16), f"{len(bf16)} ok bf16 records")


def quant_device_problems(records: list[dict[str, Any]]) -> list[str]:
    """bitsandbytes' quant state lives on the record's device (cuda:N on a GPU: its CUDA kernels ran)."""
    quantized = [r for r in records if r["status"] == "ok" and r["precision"] in BNB_PRECISIONS]
    missing = _missing_field(quantized, "quant_state_device")
    if missing:
        return [missing]
    problems = []
    for record in quantized:
        devices = [d for d in (record.get("quant_state_device") or "").split(",") if d]
        kind = record["device"].split(":")[0]
        if not devices or any(d.split(":")[0] != kind for d in devices):
            problems.append(f"{label(record)}: quant state on {record.get('quant_state_device')!r}, not {kind}")
    return problems


def check_quant_device(records: list[dict[str, Any]]) -> Check:
    quantized = [r for r in records if r["status"] == "ok" and r["precision"] in BNB_PRECISIONS]
    devices = sorted({str(r.get("quant_state_device")) for r in quantized})
    detail = f"{len(quantized)} ok bitsandbytes records, quant state on {', '.join(devices) or '-'}"
    return Check("bnb-quant-state-device", quant_device_problems(records), len(quantized), detail)


def roofline_problems(records: list[dict[str, Any]]) -> list[str]:
    """CUDA decoders with a decode rate have 0 < decode_roofline_frac <= 1 against the measured bandwidth."""
    problems = []
    for record in ok_cuda(records):
        if record.get("model_kind") == "encoder" or record.get("decode_tok_s") is None:
            continue
        frac = record.get("decode_roofline_frac")
        if frac is None:
            reason = record.get("na_reasons", {}).get("decode_roofline_frac", "no reason given")
            problems.append(f"{label(record)}: decode_roofline_frac is null ({reason})")
        elif not 0 < frac <= 1:
            problems.append(
                f"{label(record)}: decode_roofline_frac {frac:.4g} outside (0, 1] "
                f"(decode {record['decode_tok_s']:.1f} tok/s, floor {record.get('decode_roofline_tok_s')})"
            )
    return problems


def check_roofline(records: list[dict[str, Any]]) -> Check:
    decoders = [r for r in ok_cuda(records) if r.get("model_kind") != "encoder" and r.get("decode_tok_s") is not None]
    fracs = [r["decode_roofline_frac"] for r in decoders if r.get("decode_roofline_frac") is not None]
    detail = f"{len(decoders)} CUDA decode measurements"
    if fracs:
        detail += f", decode_roofline_frac from {min(fracs):.4f} to {max(fracs):.4f}"
    bandwidths = {r.get("memory_bandwidth_bytes_s") for r in decoders} - {None}
    if bandwidths:
        detail += f", bandwidth {max(bandwidths) / 1e12:.2f} TB/s"
    return Check("decode-roofline", roofline_problems(records), len(decoders), detail)


def timing_field_problems(records: list[dict[str, Any]]) -> list[str]:
    """The quantizer's import and CUDA context creation are measured apart from load_s:
    quantizer_import_s for bitsandbytes precisions, device_init_s for every CUDA record."""
    cuda = ok_cuda(records)
    problems = [m for m in (_missing_field(cuda, "quantizer_import_s"), _missing_field(cuda, "device_init_s")) if m]
    if problems:
        return problems
    for record in cuda:
        if record.get("device_init_s") is None or record["device_init_s"] < 0:
            problems.append(f"{label(record)}: device_init_s = {record.get('device_init_s')}")
        if record["precision"] in BNB_PRECISIONS:
            value = record.get("quantizer_import_s")
            if value is None or value < 0:
                problems.append(f"{label(record)}: quantizer_import_s = {value} (bitsandbytes import not separated)")
    return problems


def check_timing_fields(records: list[dict[str, Any]]) -> Check:
    cuda = ok_cuda(records)
    imports = [r["quantizer_import_s"] for r in cuda if r.get("quantizer_import_s") is not None]
    inits = [r["device_init_s"] for r in cuda if r.get("device_init_s") is not None]
    detail = f"{len(cuda)} ok CUDA records"
    if inits:
        detail += f", device_init_s median {statistics.median(inits):.3f} s"
    if imports:
        detail += f", quantizer_import_s median {statistics.median(imports):.3f} s"
    return Check("import-and-init-outside-load", timing_field_problems(records), len(cuda), detail)


def nvml_pid_problems(log: NvmlLog, worker_pids: set[int]) -> list[str]:
    """Only workers ever held a CUDA context: no parent, forkserver or other process in NVML's list."""
    if "error" in log.header:
        return [f"NVML could not be sampled: {log.header['error']}"]
    if not log.samples:
        return ["the NVML log has no samples"]
    seen = [p for s in log.samples for p in s.get("processes", [])]
    if not seen:
        return [
            f"NVML listed no compute process in {len(log.samples)} samples: nothing shows where CUDA contexts "
            "lived (pid namespace, or the sampler ran outside the run)"
        ]
    problems, reported = [], set()
    for process in seen:
        pid, role = process["pid"], process.get("role")
        if role in BAD_ROLES and pid not in worker_pids and pid not in reported:
            reported.add(pid)
            problems.append(f"pid {pid} ({role}: {process.get('cmd', '')[:80]}) held a CUDA context")
    return problems


def check_nvml_pids(log: NvmlLog | None, records: list[dict[str, Any]], required: bool) -> Check:
    if log is None:
        problems = ["no NVML log (pass --nvml-log FILE, written by ci/gpu/nvml_sampler.py)"] if required else []
        return Check("cuda-contexts-only-in-workers", problems, 0, "no NVML log")
    worker_pids = {r["worker_pid"] for r in records if r.get("worker_pid") is not None}
    roles: dict[int, str] = {}
    for sample in log.samples:
        for process in sample.get("processes", []):
            if roles.get(process["pid"]) in (None, "gone"):
                roles[process["pid"]] = process.get("role") or "gone"
    span = log.samples[-1]["t"] - log.samples[0]["t"] if len(log.samples) > 1 else 0.0
    counts = {role: sum(r == role for r in roles.values()) for role in sorted(set(roles.values()))}
    matched = len(set(roles) & worker_pids)
    detail = (
        f"{len(log.samples)} samples over {span:.0f} s, {len(roles)} pids held a context "
        f"({', '.join(f'{n} {role}' for role, n in counts.items()) or 'none'}); "
        f"{matched} of them are records' worker_pid ({len(worker_pids)} records carry one)"
    )
    missing = _missing_field(records, "worker_pid")
    if missing:
        detail += f"; {missing}"
    return Check("cuda-contexts-only-in-workers", nvml_pid_problems(log, worker_pids), len(log.samples), detail)


def check_cuda_present(records: list[dict[str, Any]]) -> Check:
    cuda = ok_cuda(records)
    problems = [] if cuda else ["no ok CUDA record in this run"]
    return Check("cuda-ran", problems, len(records), f"{len(cuda)} ok CUDA records of {len(records)}")


def memory_limit_problems(records: list[dict[str, Any]]) -> list[str]:
    """Under a small --memory-limit every combination is an `oom` failure; on CUDA, the allocator's own."""
    if not records:
        return ["no records"]
    problems = []
    for record in records:
        error = record.get("error") or ""
        if record["status"] != "failed" or record.get("error_kind") != "oom":
            problems.append(f"{label(record)}: {record['status']} / {record.get('error_kind')}, expected failed / oom")
        elif is_cuda(record) and "out of memory" not in error.lower():
            problems.append(f"{label(record)}: oom, but not from the CUDA allocator: {error}")
    return problems


def check_memory_limit(records: list[dict[str, Any]]) -> Check:
    errors = sorted({(r.get("error") or "")[:120] for r in records})
    return Check("memory-limit-oom", memory_limit_problems(records), len(records), "; ".join(errors) or "no records")


# --- the whole run ----------------------------------------------------------------------------


def run_checks(
    run_dir: Path, nvml_log: Path | None = None, require_cuda: bool = False, expect_oom: bool = False
) -> list[Check]:
    """Every check over one run dir."""
    records = read_records(run_dir)
    if expect_oom:
        return [check_memory_limit(records)]
    if nvml_log is None and (run_dir / NVML_LOG).is_file():
        nvml_log = run_dir / NVML_LOG
    log = read_nvml_log(nvml_log) if nvml_log else None
    checks = [check_outcomes(records)]
    if require_cuda:
        checks.append(check_cuda_present(records))
    checks += [
        check_device_peak(records, load_model_configs(records, run_dir)),
        check_nvml_reserved(records),
        check_bf16(records),
        check_quant_device(records),
        check_roofline(records),
        check_timing_fields(records),
        check_nvml_pids(log, records, require_cuda),
    ]
    return checks


def _num(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def anchor_lines(records: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """The 1B-class Llama's numbers beside FACTS' H100 anchors, and the decode-step profile."""
    low, high = ANCHOR_PARAMS
    big = [r for r in ok_cuda(records) if low <= (r.get("param_count") or 0) <= high]
    lines = []
    if big:
        lines.append(
            f"anchors: {Path(big[0]['model']).name} ({big[0]['param_count'] / 1e9:.2f}B) here vs FACTS (H100, plain generate)"
        )
        lines.append(
            "  precision  load_s (H100)    decode tok/s (H100)  roofline_frac  load GB/s  weights GB  peak alloc GB"
        )
        order = list(ANCHORS_H100)
        for record in sorted(big, key=lambda r: order.index(r["precision"]) if r["precision"] in order else 99):
            anchor_load, anchor_decode = ANCHORS_H100.get(record["precision"], (None, None))
            lines.append(
                f"  {record['precision']:9} {_num(record.get('load_s')):>6} ({_num(anchor_load)})"
                f"    {_num(record.get('decode_tok_s'), 1):>7} ({_num(anchor_decode, 1)})"
                f"       {_num(record.get('decode_roofline_frac'), 4):>8}"
                f"  {_num(record.get('load_bandwidth_bytes_s'), scale=1e9):>9}"
                f"  {_num(record.get('weight_bytes'), scale=1e9):>10}"
                f"  {_num(record.get('peak_device_allocated_bytes'), scale=1e9):>13}"
            )
        bf16 = next((r for r in big if r["precision"] == "bf16"), None)
        if bf16 is not None:
            lines.append(
                f"  bf16: load_s {bf16.get('load_s'):.2f} s vs from_pretrained 0.99 s and raw safetensors->GPU "
                f"{ANCHOR_RAW_READ_S[0]}-{ANCHOR_RAW_READ_S[1]} s; decode {bf16.get('decode_tok_s') or 0:.1f} tok/s "
                f"= {(bf16.get('decode_roofline_frac') or 0) * 100:.1f} % of the floor vs 16.9 tok/s = "
                f"{ANCHOR_BF16_FLOOR_FRAC * 100:.1f} %"
            )
    else:
        lines.append("anchors: no ok CUDA record of a 1B-class model in this run")
    summary_path = run_dir / PROFILE_SUMMARY
    if summary_path.is_file():
        profile = json.loads(summary_path.read_text())
        step = profile["decode_step"]
        lines.append(
            f"profile of one bf16 decode step ({profile.get('device_name')}): wall {profile['step_wall_s'] * 1e3:.2f} ms "
            f"unprofiled ({profile['decode_tok_s']:.1f} tok/s); profiled {step['wall_s'] * 1e3:.2f} ms with "
            f"{step['kernel_s'] * 1e3:.3f} ms of kernels ({step['kernels']} kernels, {step['kernel_launches']} launches), "
            f"device busy {(step.get('device_busy_frac') or 0) * 100:.1f} %"
        )
        if profile.get("raw_read_s"):
            lines.append(
                f"  this machine: raw safetensors -> device {min(profile['raw_read_s']):.2f} s, one from_pretrained "
                f"bf16 {profile['load_s']:.2f} s (FACTS H100: {ANCHOR_RAW_READ_S[0]}-{ANCHOR_RAW_READ_S[1]} s, 0.99 s)"
            )
        if profile.get("decode_floor_s"):
            lines.append(
                f"  floor {profile['decode_floor_s'] * 1e3:.3f} ms per step (weights / copy bandwidth): a bare decode "
                f"step reaches {profile['decode_roofline_frac'] * 100:.1f} % of it"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ci/gpu/cudacheck.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--nvml-log", type=Path, help=f"nvml_sampler.py's log (default: RUN_DIR/{NVML_LOG} if present)")
    parser.add_argument("--require-cuda", action="store_true", help="no ok CUDA record, or no NVML log, is a FAIL")
    parser.add_argument("--expect-oom", action="store_true", help="the run of a small --memory-limit: all oom")
    args = parser.parse_args(argv)
    if not (args.run_dir / "results.jsonl").is_file():
        print(f"cudacheck: {args.run_dir} has no results.jsonl: give a run dir", file=sys.stderr)
        return 2
    checks = run_checks(args.run_dir, args.nvml_log, args.require_cuda, args.expect_oom)
    print(f"cudacheck {args.run_dir}")
    for check in checks:
        for line in check.lines():
            print(line)
    if not args.expect_oom:
        for line in anchor_lines(read_records(args.run_dir), args.run_dir):
            print(line)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
