"""torchao: weight-only int8 / float8 / int4 and dynamic int8 activations, through TorchAoConfig.

Precision options: {"config": name of a torchao.quantization config class, "kwargs": its arguments}.
torchao 0.18 keeps a quantized weight as a tensor subclass (Int8Tensor, Float8Tensor, ...) whose
inner plain tensors (qdata, scale, zero_point) hold the bytes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.backends.quantizers import PlannedLinear, plain_tensors
from harness.registry import PRECISIONS, Precision

# torchao 0.18, CPU: Int4WeightOnlyConfig fails with every int4_packing_format (plain and preshuffled
# import mslk, a CUDA-only kernel library; plain_int32 refuses device 'cpu'; tile_packed_to_4d asserts CUDA).
INT4_CPU_REASON = PRECISIONS["ao-int4wo"].device_reasons["cpu"]


def quantization_config(precision: Precision, compute_dtype: torch.dtype) -> Any:
    """TorchAoConfig wrapping the torchao config class the precision names (weight-only configs
    compute in the weights' dtype, so `compute_dtype` is the storage dtype the caller loads with)."""
    import torchao.quantization
    from transformers import TorchAoConfig

    options = precision.options
    config_class = getattr(torchao.quantization, options["config"])
    return TorchAoConfig(quant_type=config_class(**dict(options.get("kwargs", {}))))


def is_torchao_tensor(tensor: Any) -> bool:
    """Whether `tensor` is a torchao quantized tensor subclass (not a plain tensor or Parameter)."""
    return isinstance(tensor, torch.Tensor) and type(tensor).__module__.startswith("torchao.")


def quantized_weight(module: torch.nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    """A module whose `weight` torchao replaced: (its logical element count, qdata + scale + zero_point ...)."""
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if not is_torchao_tensor(weight):
        return None
    return weight.numel(), list(plain_tensors(weight))


# What each config stores per weight of shape (out, in), torchao 0.18, read off real loads (CPU, bf16
# and fp32 weights): Int8Tensor = int8 qdata + an fp32 scale and an int8 zero point per output row
# (weight-only and dynamic-activation alike); Float8Tensor = float8 qdata + an fp32 scale per row.
# Int4Tensor (Int4WeightOnlyConfig's default "plain" packing, CUDA only) from torchao's source, not
# measured here (no GPU): two elements per uint8 + a scale and a zero point per group of
# `group_size` (128) input columns at the weight's dtype; a weight whose row is not a multiple of the
# group stays unquantized (torchao logs "Skipping quantizing weight").
INT8_ROW_BYTES = 4 + 1  # fp32 scale + int8 zero point
FLOAT8_ROW_BYTES = 4  # fp32 scale
INT4_DEFAULT_GROUP = 128


def planned_bytes(precision: Precision, linear: PlannedLinear) -> int | None:
    """Bytes of one nn.Linear under the precision's torchao config; None for a layer torchao leaves
    as is (transformers' Conv1D, which is no nn.Linear; int4 rows that are not whole groups)."""
    if linear.conv1d:
        return None
    numel, rows = linear.numel, linear.out_features
    bias = linear.bias * linear.storage_bytes
    config = precision.options.get("config")
    if config in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"):
        return numel + rows * INT8_ROW_BYTES + bias
    if config == "Float8WeightOnlyConfig":
        return numel + rows * FLOAT8_ROW_BYTES + bias
    if config == "Int4WeightOnlyConfig":
        group = int(dict(precision.options.get("kwargs", {})).get("group_size", INT4_DEFAULT_GROUP))
        if linear.in_features % group:
            return None
        return numel // 2 + 2 * (numel // group) * linear.storage_bytes + bias
    # a config without a measured rule: its bits per weight + an fp32 scale per row (an estimate)
    return math.ceil(numel * precision.bits / 8) + rows * 4 + bias
