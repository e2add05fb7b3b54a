"""optimum-quanto: int8 / int4 / int2 / float8 weights through transformers' QuantoConfig.

Precision options: {"weights": "int8" | "int4" | "int2" | "float8"}. Linear layers become QLinear;
their weight is a QBytesTensor (int8/float8 data + one scale per output row) or a QBitsTensor
(a PackedTensor of 2 or 4-bit codes + a scale and a shift per group of input columns).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.backends.quantizers import PlannedLinear, plain_tensors
from harness.registry import Precision

# optimum-quanto 0.2.7 (nn/qmodule.py, tensor/weights/qbits.py), read off real loads on CPU:
# int8/float8: 8-bit data + one scale per output row at the weight's dtype. int4/int2: codes packed
# 8 / bits per uint8 along the grouped rows + a scale and a shift per group at the weight's dtype;
# the group is 128 input columns, stepped down by 32 (to 32 at least) until it divides the row, and
# the whole row when the row is 128 or shorter or nothing divides it. The TinyGemm layout it picks
# for int4 bf16 groups of 128 holds the same bytes (uint8 pairs + an interleaved scale/shift).
# Every QModule also registers two scalar buffers (input_scale, output_scale): fp32, since
# transformers builds the QLinear before it has a weight (scale_dtype is float32 then).
GROUP_START, GROUP_STEP, GROUP_MIN = 128, 32, 32
SCALAR_BUFFER_BYTES = 2 * 4


def quantization_config(precision: Precision, compute_dtype: torch.dtype) -> Any:
    """QuantoConfig(weights=...): weight-only (activations stay in the compute dtype; quanto
    refuses activation quantization through transformers on CPU)."""
    from transformers import QuantoConfig

    return QuantoConfig(weights=precision.options["weights"])


def quantized_weight(module: torch.nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    """A quanto QModule with a quantized weight: (its logical element count, packed data + scale
    (+ shift)), as plain tensors (a PackedTensor's own storage is a fake, unpacked-size one)."""
    from optimum.quanto import QTensor

    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if not isinstance(weight, QTensor):
        return None
    return weight.numel(), list(plain_tensors(weight))


def group_size(in_features: int) -> int | None:
    """quanto's group for a row of `in_features` (QModuleMixin.__init__), None for one per row."""
    group = GROUP_START
    if in_features <= group:
        return None
    while in_features % group and group > GROUP_MIN:
        group -= GROUP_STEP
    return group if in_features % group == 0 else None


def planned_bytes(precision: Precision, linear: PlannedLinear) -> int | None:
    """Bytes of one nn.Linear as a QLinear (None for transformers' Conv1D, which quanto leaves)."""
    if linear.conv1d:
        return None
    width = linear.storage_bytes
    extra = linear.bias * width + SCALAR_BUFFER_BYTES
    weights = precision.options["weights"]
    if weights in ("int8", "float8"):
        return linear.numel + linear.out_features * width + extra
    bits = {"int4": 4, "int2": 2}[weights]
    group = group_size(linear.in_features) or linear.in_features
    groups = linear.numel // group
    packed = math.ceil(groups / (8 // bits)) * group
    return packed + 2 * groups * width + extra
