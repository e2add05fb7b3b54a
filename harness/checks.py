"""What the suites assert about a record: compatibility, agreement tolerances, budgets.

Each check returns a list of problems (empty when it passes), so a failing test prints numbers.
"""

from __future__ import annotations

import math
from typing import Any

# Compat agreement with the reference, per precision: the largest kl_mean (decoders, nats per
# token) or 1 - embed_cosine_mean (encoders) that still counts as "agrees". Chosen from the zoo's
# measured values on CPU with head-room; override per precision in the matrix file [tolerances].
DEFAULT_TOLERANCES: dict[str, float] = {
    "fp32": 1e-4,
    "fp16": 1e-2,
    "bf16": 5e-2,
    "int8": 1e-1,
    "nf4": 1.0,
    "nf4-dq": 1.0,
    "fp4": 1.5,
    "keras-int8": 1e-1,
    "keras-int4": 1.5,
}
ENCODER_TOLERANCE_SCALE = 0.2  # 1 - cosine is on a smaller scale than KL


def quality_loss(record: dict[str, Any]) -> tuple[str, float | None]:
    """(metric name, value): kl_mean for decoders, 1 - embed_cosine_mean for encoders."""
    if record.get("model_kind") == "encoder":
        cosine = record.get("embed_cosine_mean")
        return "1 - embed_cosine_mean", None if cosine is None else 1.0 - cosine
    return "kl_mean", record.get("kl_mean")


def agreement_problems(record: dict[str, Any], tolerances: dict[str, float]) -> list[str]:
    """Does the combination agree with its reference within the per-precision tolerance?"""
    metric, loss = quality_loss(record)
    if loss is None:
        reason = record["na_reasons"].get(metric.split()[-1], "not measured")
        return [f"no agreement measured: {reason}"]
    limit = tolerances.get(record["precision"], DEFAULT_TOLERANCES.get(record["precision"], math.inf))
    if record.get("model_kind") == "encoder" and record["precision"] not in tolerances:
        limit *= ENCODER_TOLERANCE_SCALE
    if loss > limit:
        return [
            f"{metric} = {loss:.6g} exceeds the {record['precision']} tolerance {limit:g} (vs {record['reference_precision']})"
        ]
    return []


def roundtrip_problems(record: dict[str, Any], tolerance: float = 1e-3) -> list[str]:
    """save_pretrained -> from_pretrained must give the same outputs."""
    diff = record.get("roundtrip_max_abs_diff")
    if diff is None:
        return []  # not serializable: the record says why
    return [f"outputs changed after a save/load round trip: max |diff| = {diff:.3g}"] if diff > tolerance else []


BUDGET_CHECKS: dict[str, tuple[str, str]] = {
    "max_load_s": ("load_s", "max"),
    "max_weight_bytes": ("weight_bytes", "max"),
    "min_decode_tok_s": ("decode_tok_s", "min"),
    "max_kl_mean": ("kl_mean", "max"),
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
