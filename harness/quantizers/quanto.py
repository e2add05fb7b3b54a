"""optimum-quanto: int8 / int4 / int2 / float8 weights through transformers' QuantoConfig.

Precision options: {"weights": "int8" | "int4" | "int2" | "float8"}. Linear layers become QLinear;
their weight is a QBytesTensor (int8/float8 data + one scale per output row) or a QBitsTensor
(a PackedTensor of 2 or 4-bit codes + a scale and a shift per group of input columns).
"""

from __future__ import annotations

from typing import Any

import torch

from harness.quantizers import plain_tensors
from harness.registry import Precision


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
