"""What the suites assert about a record: compatibility, agreement tolerances, budgets.

Each check returns a list of problems (empty when it passes), so a failing test prints numbers.
"""

from __future__ import annotations

import math
from typing import Any

from harness.records import METRICS, TRAIN_PHASES
from harness.registry import PRECISIONS

# Compat agreement with the reference. Each default is the quality loss that precision showed on
# the zoo's trained models (the registry's `Precision.measured_loss`, with how it was measured),
# times TOLERANCE_MARGIN: large enough for another machine's build of tiny-llama-trained (training
# is deterministic per machine and thread count; two builds gave nf4 KL 2.9e-4 and 4.7e-4), small
# enough that a broken quantizer fails (tests/test_compat_checks.py). Models with random weights
# have no meaningful agreement scale.
TOLERANCE_MARGIN = 5.0
TOLERANCE_FLOOR = 1e-6  # the reference's own precision measures exactly 0


def default_tolerance(metric: str, precision: str) -> float:
    """measured loss x margin (at least the floor); infinite where nothing was measured."""
    spec = PRECISIONS.get(precision)
    loss = spec.measured_loss.get(metric) if spec else None
    return math.inf if loss is None else max(loss * TOLERANCE_MARGIN, TOLERANCE_FLOOR)


def quality_loss(record: dict[str, Any]) -> tuple[str, float | None]:
    """(metric name, value): kl_mean for decoders, 1 - embed_cosine_mean for encoders."""
    if record.get("model_kind") == "encoder":
        cosine = record.get("embed_cosine_mean")
        return "1 - embed_cosine_mean", None if cosine is None else 1.0 - cosine
    return "kl_mean", record.get("kl_mean")


def agreement_problems(record: dict[str, Any], tolerances: dict[str, float]) -> list[str]:
    """Does the combination agree with its reference within the per-precision tolerance?

    `tolerances` (the matrix file's) override the defaults for both metrics.
    """
    metric, loss = quality_loss(record)
    if loss is None:
        reason = record["na_reasons"].get(metric.split()[-1], "not measured")
        return [f"no agreement measured: {reason}"]
    precision = record["precision"]
    limit = tolerances.get(precision, default_tolerance(metric, precision))
    if loss > limit:
        return [
            f"{metric} = {loss:.6g} exceeds the {precision} tolerance {limit:g} (vs {record['reference_precision']})"
        ]
    return []


ROUNDTRIP_TOLERANCE = 1e-3  # max |output diff| a save/load round trip may leave


def roundtrip_problems(record: dict[str, Any], tolerance: float = ROUNDTRIP_TOLERANCE) -> list[str]:
    """save_pretrained -> from_pretrained must give the same outputs (callers skip a null diff with its reason).

    Where the backend split the round trip, the problem says which half changed the outputs: the save
    (the live model itself changed) or the load (the reload differs from what was saved)."""
    diff = record.get("roundtrip_max_abs_diff")
    if diff is None:
        return [f"no round trip measured: {record['na_reasons'].get('roundtrip_max_abs_diff', 'no reason given')}"]
    if diff <= tolerance:
        return []
    live, reload = record.get("roundtrip_live_max_abs_diff"), record.get("roundtrip_reload_max_abs_diff")
    split = "" if live is None or reload is None else (
        f" (save_pretrained changed the live model's outputs by {live:.3g}; the reload differs from the saved "
        f"model by {reload:.3g})"
    )  # fmt: skip
    return [f"outputs changed after a save/load round trip: max |diff| = {diff:.3g}{split}"]


# the known-issues table's entry (harness.known_issues) that a round trip's measured signature identifies
BNB_CPU_SAVE_ISSUE = "bnb-4bit-cpu-packed-save"


def known_roundtrip_issue(record: dict[str, Any], tolerance: float = ROUNDTRIP_TOLERANCE) -> str | None:
    """The known library bug a failed round trip shows, by its measured signature, else None: a
    bitsandbytes 4-bit model on the CPU whose save changed the live model while the load reproduced
    what was saved (the AVX512-BF16 repack; CPUs without it never repack and pass)."""
    from harness.registry import PRECISIONS

    spec = PRECISIONS.get(record.get("precision", ""))
    live, reload = record.get("roundtrip_live_max_abs_diff"), record.get("roundtrip_reload_max_abs_diff")
    if spec is None or spec.family != "bitsandbytes" or spec.bits != 4 or record.get("device") != "cpu":
        return None
    if live is None or reload is None or live <= tolerance or reload > tolerance:
        return None
    from harness.known_issues import BY_ID

    return BY_ID[BNB_CPU_SAVE_ISSUE].xfail_reason()


def load_problems(record: dict[str, Any]) -> list[str]:
    """A load that counts: positive time, weights that account for the parameters, memory that adds up."""
    problems = []
    if not (record.get("load_s") or 0) > 0:
        problems.append(f"load_s = {record.get('load_s')!r} is not positive")
    weight, params = record.get("weight_bytes") or 0, record.get("param_count") or 0
    if params <= 0 or weight <= 0:
        problems.append(f"weight_bytes = {weight}, param_count = {params}: nothing was loaded")
    elif not 0.4 <= weight / params <= 4.5:  # 4-bit with states ~0.5-0.7, fp32 4 bytes (+ buffers)
        problems.append(f"weight_bytes / param_count = {weight / params:.3g} bytes: not any storage dtype")
    if (record.get("peak_rss_bytes") or 0) < (record.get("rss_before_load_bytes") or 0):
        problems.append("peak_rss_bytes is below the baseline before load")
    parts = [record.get(k) for k in ("rss_anon_bytes", "rss_file_bytes", "rss_shmem_bytes")]
    if None not in parts and abs(sum(parts) - (record.get("rss_after_load_bytes") or 0)) > 64 << 10:
        problems.append("rss_anon + rss_file + rss_shmem do not add up to rss_after_load_bytes")
    return problems


# budget name -> (field, "max" or "min"): a metric declared with budget=True gets a ceiling when
# lower is better (max_load_s) and a floor when higher is better (min_decode_tok_s).
BUDGET_CHECKS: dict[str, tuple[str, str]] = {
    f"{'min' if m.higher_is_better else 'max'}_{name}": (name, "min" if m.higher_is_better else "max")
    for name, m in METRICS.items()
    if m.budget
}


def budget_problems(record: dict[str, Any], budgets: dict[str, float], names: tuple[str, ...]) -> list[str]:
    """Breaches of the declared budgets among `names` (budgets whose field is null are not applicable)."""
    problems = []
    for name in names:
        if name not in budgets:
            continue
        field, kind = BUDGET_CHECKS[name]
        value, limit = record.get(field), budgets[name]
        if value is None:
            continue
        if (kind == "max" and value > limit) or (kind == "min" and value < limit):
            problems.append(f"{field} = {value:.6g} breaks budget {name} = {limit:g}")
    return problems


def finite_problems(record: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """Each named field present, numeric and finite (or null with a reason)."""
    problems = []
    for name in names:
        value = record.get(name)
        if value is None:
            if name not in record.get("na_reasons", {}):
                problems.append(f"{name} is missing with no reason")
        elif not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"{name} = {value!r} is not a finite number")
    return problems


# The finetune scenario (harness.measure.finetune). An adapter saved and reloaded on a fresh base must give
# the trained model's logits: exactly for plain LoRA (measured KL 0), within the fp32 upcast that
# QLoRA trains with and a fresh base lacks (measured 2e-6 to 6e-5 nats, tiny-llama-trained and
# tiny-gpt2, int8 and nf4). Merging requantizes quantized bases: measured KL 5e-6 (int8) to 0.04
# (nf4) on tiny-llama-trained, 2e-5 to 4e-5 for 16-bit merges; the limits are those x 5.
ADAPTER_ROUNDTRIP_KL_TOLERANCE = 1e-3
MERGED_KL_TOLERANCE_4BIT = 0.2
MERGED_KL_TOLERANCE = 5e-3
PLAN_TOLERANCE_FRAC = 0.25  # each training phase's measured peak within the plan +-25 %


def training_problems(record: dict[str, Any]) -> list[str]:
    """A training row that counts: the loss fell, gradients reached every trainable tensor, every phase metered."""
    problems = []
    first, last = record.get("loss_first"), record.get("loss_last")
    if first is None or last is None or not last < first:
        problems.append(f"the loss did not fall: {first} -> {last}")
    if (record.get("grad_nonzero_frac") or 0) < 1:
        problems.append(f"only {record.get('grad_nonzero_frac')} of the trainable tensors ever got a non-zero gradient")
    for phase in ("forward", "backward", "optimizer"):
        if record.get(f"peak_rss_train_{phase}_bytes") is None:
            problems.append(f"no peak memory for the train {phase} phase")
    return problems


def adapter_problems(record: dict[str, Any], check_merge: bool = True) -> list[str]:
    """The saved adapter reloads faithfully, and merges within its precision's tolerance (where peft merges;
    `check_merge=False` for random weights, whose outputs swing with any requantization)."""
    problems = []
    kl = record.get("adapter_roundtrip_kl")
    if kl is None:
        problems.append(f"no adapter round trip: {record['na_reasons'].get('adapter_roundtrip_kl', 'no reason')}")
    elif kl > ADAPTER_ROUNDTRIP_KL_TOLERANCE:
        problems.append(
            f"adapter_roundtrip_kl = {kl:.3g} > {ADAPTER_ROUNDTRIP_KL_TOLERANCE:g}: the adapter does not reload"
        )
    merged = record.get("merged_kl") if check_merge else None
    spec = PRECISIONS.get(record["precision"])
    limit = MERGED_KL_TOLERANCE_4BIT if spec is not None and spec.quantized and spec.bits <= 4 else MERGED_KL_TOLERANCE
    if merged is not None and merged > limit:
        problems.append(f"merged_kl = {merged:.3g} > {limit:g}: the merged weights do not match the adapter")
    return problems


def plan_problems(record: dict[str, Any], tolerance: float = PLAN_TOLERANCE_FRAC) -> list[str]:
    """Each training phase's measured peak (above the pre-load baseline on the host) within the plan's
    +-tolerance, or on the host within the runtime's machine-to-machine spread (memplan.RUNTIME_SPREAD_BYTES).
    On the host the optimizer step's RSS may lie anywhere from its own plan up to the backward's: glibc
    keeps heap the backward freed (measured: 0.5B bf16 without checkpointing, optimizer RSS 1551 MiB
    for 1108 MiB of planned tensors, backward 2115 MiB)."""
    from harness.plan.memplan import RUNTIME_SPREAD_BYTES

    problems = []
    host = record["device"] == "cpu"
    for phase in TRAIN_PHASES:
        name = phase.replace("_", " ")
        planned = record.get(f"predicted_{phase}_bytes")
        measured = record.get(f"peak_rss_{phase}_bytes" if host else f"peak_device_allocated_{phase}_bytes")
        if planned is None or measured is None:
            problems.append(f"{name}: no plan or no measurement to compare")
            continue
        measured -= record["rss_before_load_bytes"] if host else 0
        spread = RUNTIME_SPREAD_BYTES if host else 0
        retained = record.get("predicted_train_backward_bytes") if host and phase == "train_optimizer" else None
        low, high = planned, max(planned, retained or planned)
        slack = max(tolerance * measured, spread)
        if not low - slack <= measured <= high + slack:
            shown = f"{planned / 2**20:.0f}" if low == high else f"{low / 2**20:.0f}-{high / 2**20:.0f}"
            problems.append(
                f"{name}: planned {shown} MiB, measured {measured / 2**20:.0f} MiB "
                f"({planned / measured - 1:+.0%}, beyond ±{tolerance:.0%} and ±{spread >> 20} MiB)"
            )
    return problems
