"""bitsandbytes: LLM.int8() and 4-bit NF4/FP4 (with or without double quantization)."""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.backends.quantizers import PlannedLinear
from harness.registry import Precision

# Storage rules of bitsandbytes 0.50.2, read off real loads (tests/test_memplan.py checks them).
BLOCK_4BIT = 64  # elements per absmax
NESTED_BLOCK = 256  # absmax values per nested (double-quantization) absmax
CODE_4BIT_BYTES = 16 * 4  # each 4-bit layer holds its own 16-entry fp32 code table
NESTED_OFFSET_BYTES = 4  # double quantization: one fp32 offset per layer
NESTED_CODE_BYTES = 256 * 4  # double quantization: each layer's own copy of the 256-entry dynamic map
INT8_SCALE_BYTES = 4  # LLM.int8(): one fp32 scale (SCB) per output row


def quantization_config(precision: Precision, compute_dtype: torch.dtype) -> Any:
    """BitsAndBytesConfig from the precision's options (load_in_8bit, or quant_type + double_quant)."""
    from transformers import BitsAndBytesConfig

    options = precision.options
    if options.get("load_in_8bit"):
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options["quant_type"],
        bnb_4bit_use_double_quant=options["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantized_weight(module: torch.nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    """Linear4bit: packed weight + absmax/code/offset (and the nested state's); Linear8bitLt: int8
    weight + SCB, which lives on the weight until the first forward, then in `module.state`."""
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        tensors = [weight]
        for state in (quant_state, getattr(quant_state, "state2", None)):
            tensors += [getattr(state, name, None) for name in ("absmax", "code", "offset")]
        return quant_state.shape.numel(), [t for t in tensors if isinstance(t, torch.Tensor)]
    if type(module).__name__ == "Linear8bitLt":
        state = getattr(module, "state", None)
        tensors = [weight, getattr(weight, "SCB", None), getattr(state, "SCB", None), getattr(state, "CB", None)]
        return weight.numel(), [t for t in tensors if isinstance(t, torch.Tensor)]
    return None


def planned_bytes(precision: Precision, linear: PlannedLinear) -> int:
    """Bytes of one Linear or Conv1D after the load and first forward (transformers replaces both).

    int8: int8 weight + an fp32 SCB per output row; the bias stays at the storage dtype (fp16).
    4-bit: two elements per byte + the layer's code table + an absmax per 64 elements: fp32, or, with
    double quantization, uint8 plus an fp32 absmax per 256 of them, a 256-entry map and an offset.
    AVX512-BF16 CPUs repack at the first forward (`cpu_packed`: bitsandbytes'
    _convert_weight_packed_for_cpu): one bf16 absmax per block, the nested state dropped, the
    offset kept. Linear4bit's forward casts its bias to the compute dtype.
    """
    numel = linear.numel
    if precision.options.get("load_in_8bit"):
        return numel + linear.out_features * INT8_SCALE_BYTES + linear.bias * linear.storage_bytes
    blocks = math.ceil(numel / BLOCK_4BIT)
    total = math.ceil(numel / 2) + CODE_4BIT_BYTES + linear.bias * linear.compute_bytes
    double = bool(precision.options.get("double_quant"))
    if linear.cpu_packed:
        return total + blocks * 2 + (NESTED_OFFSET_BYTES if double else 0)
    if double:
        return total + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NESTED_CODE_BYTES + NESTED_OFFSET_BYTES
    return total + blocks * 4
