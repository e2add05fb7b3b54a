"""The pre-flight: will a combination fit its device? Decided from config.json before any load.

The plan itself (harness.plan.memplan) builds the architecture on the meta device, so it needs torch;
the parent never imports torch, so plans are computed in one worker per model (mode "plan",
forked from the preloaded forkserver: ~0.1 s) and the fit is decided here in the parent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.nvml import nvml_session
from harness.plan.matrix import Capabilities, Combo
from harness.registry import DEFAULT_PRECISIONS
from harness.units import GIB, human_bytes
from harness.workload import CHUNK_TOKENS

MARGIN_FRAC = 0.05  # of the available memory, kept free for allocator slack and the rest of the machine
# Device memory the runtime holds before the model: a CUDA context takes ~0.5 GiB. On the host the
# worker's framework baseline (rss_before_load_bytes, 330-380 MB here) is mostly shared, file-backed
# library pages, and the plan and --available-memory speak of the model's own bytes, so it adds 0.
RUNTIME_BASELINE_BYTES = {"cpu": 0, "cuda": 512 << 20, "xla": 0}
FIT_ORDER = DEFAULT_PRECISIONS  # precisions suggested, in this order, when one does not fit


@dataclass(frozen=True)
class Fit:
    """One combination's predicted need against what its device has."""

    needed_bytes: int
    available_bytes: int | None
    reason: str | None  # set when it does not fit


def plans_for(
    config: dict[str, Any], precisions: tuple[str, ...], fast_bf16: bool, options: Any, device: str
) -> dict[str, Any]:
    """MemoryPlan per precision for one model and device, for the phases `options` run (no quality
    chunk with --no-quality, no prefill/decode with --no-throughput)."""
    from harness.plan.memplan import plan_memories

    names = tuple(dict.fromkeys(precisions))
    found = plan_memories(
        config,
        names,
        fast_bf16=fast_bf16,
        batch_size=max(options.batch_sizes),
        prompt_tokens=max(options.prompt_lengths),
        new_tokens=options.new_tokens,
        logits_tokens=CHUNK_TOKENS if options.quality else 0,
        device=device,
        throughput=options.throughput,
        eval_tokens=options.eval_tokens,
    )
    return dict(zip(names, found, strict=True))


def plan_fields(job: Any) -> dict[str, Any]:
    """Worker side (mode "plan"): the memory plan of every default precision and the selected ones."""
    from dataclasses import asdict

    from harness.plan.memplan import read_config

    precisions = (*DEFAULT_PRECISIONS, *job.plan_precisions)
    config = read_config(job.model.source)
    if job.options.scenario == "finetune":  # the selected precisions only: each training shape is a simulation
        from harness.plan.trainplan import training_plans_for

        plans = training_plans_for(config, job.plan_precisions, job.fast_bf16, job.options, job.combo.device)
        return {"plans": plans}
    plans = plans_for(config, precisions, job.fast_bf16, job.options, job.combo.device)
    return {"plans": {name: asdict(plan) for name, plan in plans.items()}}


def device_kind(device: str) -> str:
    return device.partition(":")[0]


def available_bytes(device: str, capabilities: Capabilities, override: int | None) -> int | None:
    """--available-memory, else NVML free memory of cuda:N, else the host's available RAM."""
    if override is not None:
        return override
    if device_kind(device) == "cuda":
        gpu = capabilities.gpu(device)
        return None if gpu is None else nvml_free_bytes(gpu.index)
    if device_kind(device) == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def nvml_free_bytes(index: int) -> int | None:
    """Free memory NVML reports on GPU `index`; None where NVML is unavailable or the query fails."""
    with nvml_session() as nvml:
        if nvml is None:
            return None
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).free)
        except nvml.NVMLError:
            return None


def needed_bytes(plan: dict[str, Any], device: str) -> int:
    """The plan's peak plus what the worker's runtime holds before loading."""
    return int(plan["peak_bytes"]) + RUNTIME_BASELINE_BYTES.get(device_kind(device), 0)


def fit(combo: Combo, plans: dict[str, dict[str, Any]], available: int | None) -> Fit:
    """Does `combo` fit `available` bytes less the margin? The reason names the numbers and an alternative."""
    plan = plans[combo.precision]
    needed = needed_bytes(plan, combo.device)
    if available is None:
        return Fit(needed, None, None)
    usable = int(available * (1 - MARGIN_FRAC))
    if needed <= usable:
        return Fit(needed, available, None)
    runtime = RUNTIME_BASELINE_BYTES.get(device_kind(combo.device), 0)
    parts = " + ".join(
        f"{name} {human_bytes(value)}"
        for name, value in (
            ("weights", plan["weight_bytes"]),
            ("KV", plan["kv_cache_bytes"]),
            ("activations", plan["activation_bytes"]),
            ("load", plan["load_transient_bytes"]),
            ("runtime", runtime),
        )
        if value or name != "runtime"
    )
    fitting = [p for p in FIT_ORDER if p in plans and needed_bytes(plans[p], combo.device) <= usable]
    if fitting:
        alternative = f"{fitting[0]} needs {human_bytes(needed_bytes(plans[fitting[0]], combo.device))}"
    else:
        smallest = min(plans, key=lambda p: needed_bytes(plans[p], combo.device))
        alternative = f"no precision fits; the smallest, {smallest}, needs {human_bytes(needed_bytes(plans[smallest], combo.device))}"
    reason = (
        f"needs ≈ {human_bytes(needed)} ({parts}); {combo.device} has {human_bytes(available)} free "
        f"(less a {MARGIN_FRAC:.0%} margin); {alternative}; --no-preflight runs it anyway"
    )
    return Fit(needed, available, reason)


COMMON_SIZES_GIB = (8, 16, 24, 40, 48, 80)  # device sizes the plan table checks besides those present


def plan_table(
    models: tuple[str, ...],
    precisions: tuple[str, ...],
    devices: tuple[str, ...],
    capabilities: Capabilities,
    options: Any,
    budget_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """`harness plan`: one row per model x precision with the predicted bytes and where it fits.

    Runs in this process (it imports torch for the meta-device build, but opens no weight file
    and touches no GPU). Columns `fits_<device>` for each present device (free memory now),
    `fits_<N>GiB` for the common sizes, and `fits_budget` with --budget-bytes.
    """
    from dataclasses import asdict

    from harness.plan.memplan import read_config

    rows = []
    for model in models:
        config = read_config(model)
        per_device = {d: plans_for(config, precisions, capabilities.runs_bf16_well(d), options, d) for d in devices}
        for precision in precisions:
            needed = {d: needed_bytes(asdict(per_device[d][precision]), d) for d in devices}
            plan = per_device[devices[0]][precision]
            row: dict[str, Any] = dict(
                model=model, precision=precision, weight_bytes=plan.weight_bytes, kv_cache_bytes=plan.kv_cache_bytes,
                activation_bytes=plan.activation_bytes, load_transient_bytes=plan.load_transient_bytes,
                peak_bytes=plan.peak_bytes, needed_bytes=needed[devices[0]], host_peak_bytes=plan.host_peak_bytes,
                device_peak_bytes=plan.device_peak_bytes, notes=plan.notes,
            )  # fmt: skip
            rows.append(row | fit_columns(needed, capabilities, options.available_memory_bytes, budget_bytes))
    return rows


def fit_columns(
    needed_by_device: dict[str, int], capabilities: Capabilities, override: int | None, budget_bytes: int | None
) -> dict[str, bool | None]:
    """A plan row's `fits_*` columns, less the margin: each present device (its free memory now; None where
    unknown), then the common sizes and the budget against the first device's need."""
    usable = 1 - MARGIN_FRAC
    columns: dict[str, bool | None] = {}
    for device, needed in needed_by_device.items():
        available = available_bytes(device, capabilities, override)
        columns[f"fits_{device}"] = None if available is None else needed <= available * usable
    first = next(iter(needed_by_device.values()))
    columns |= {f"fits_{size}GiB": first <= size * GIB * usable for size in COMMON_SIZES_GIB}
    if budget_bytes is not None:
        columns["fits_budget"] = first <= budget_bytes
    return columns


def training_fit(combo: Combo, plans: dict[str, Any], available: int | None) -> Fit:
    """Does the training step of `combo` fit `available` bytes less the pre-flight margin? The reason
    names the plan's terms at its peak phase and the first precision that would fit."""
    plan = plans[combo.precision]
    needed = needed_bytes(plan, combo.device)
    if available is None or needed <= int(available * (1 - MARGIN_FRAC)):
        return Fit(needed, available, None)
    usable = int(available * (1 - MARGIN_FRAC))
    phase_bytes = plan[plan["peak_phase"].removeprefix("train_") + "_bytes"]
    steady = (
        plan["weight_bytes"] + plan["upcast_bytes"] + plan["optimizer_state_bytes"] + plan["runtime_bytes"]
    )  # at the peak
    adapter = 0 if plan["method"] == "full" else plan["trainable_param_bytes"]
    terms = (("weights", plan["weight_bytes"]), ("fp32 upcast", plan["upcast_bytes"]), ("adapter", adapter),
             ("optimizer states", plan["optimizer_state_bytes"]),
             ("activations, gradients and temporaries", phase_bytes - steady - adapter), ("runtime", plan["runtime_bytes"]))  # fmt: skip
    parts = " + ".join(f"{name} {human_bytes(value)}" for name, value in terms if value)
    trainable = {p: v for p, v in plans.items() if not isinstance(v, str)}
    fitting = [
        p for p in (*FIT_ORDER, *trainable) if p in trainable and needed_bytes(trainable[p], combo.device) <= usable
    ]
    alternative = (
        f"{fitting[0]} needs {human_bytes(needed_bytes(trainable[fitting[0]], combo.device))}"
        if fitting
        else "no precision fits: lower --seq-len or --batch-sizes, or turn on --gradient-checkpointing"
    )
    reason = (
        f"training needs ≈ {human_bytes(needed)} at its {plan['peak_phase'].replace('_', ' ')} peak ({parts}); "
        f"{combo.device} has {human_bytes(available)} free (less a {MARGIN_FRAC:.0%} margin); {alternative}; "
        "--no-preflight runs it anyway"
    )
    return Fit(needed, available, reason)


def training_plan_table(
    models: tuple[str, ...],
    precisions: tuple[str, ...],
    devices: tuple[str, ...],
    capabilities: Capabilities,
    options: Any,
    budget_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """`harness plan --finetune`: one row per model x precision with the training step's planned bytes
    and where it fits (the columns of `plan_table`); a precision that cannot train
    keeps its row, with the reason in `notes` and no fit."""
    from harness.plan.memplan import read_config
    from harness.plan.trainplan import training_plans_for

    rows = []
    for model in models:
        config = read_config(model)
        per_device = {
            d: training_plans_for(config, precisions, capabilities.runs_bf16_well(d), options, d) for d in devices
        }
        for precision in precisions:
            row: dict[str, Any] = {"model": model, "precision": precision}
            first = per_device[devices[0]][precision]
            if isinstance(first, str):
                row.update(dict.fromkeys(TRAINING_PLAN_BYTES), needed_bytes=None, method=None, notes=first)
                row.update({f"fits_{d}": False for d in devices})
                row.update({f"fits_{size}GiB": False for size in COMMON_SIZES_GIB})
                if budget_bytes is not None:
                    row["fits_budget"] = False
                rows.append(row)
                continue
            needed = {d: needed_bytes(per_device[d][precision], d) for d in devices}
            row.update(method=first["method"], **{k: first[k] for k in TRAINING_PLAN_BYTES},
                       needed_bytes=needed[devices[0]], notes=first["notes"])  # fmt: skip
            rows.append(row | fit_columns(needed, capabilities, options.available_memory_bytes, budget_bytes))
    return rows


TRAINING_PLAN_BYTES = (
    "weight_bytes", "upcast_bytes", "trainable_param_bytes", "optimizer_state_bytes", "activation_bytes",
    "forward_bytes", "backward_bytes", "optimizer_bytes",
)  # fmt: skip
