"""HQQ (half-quadratic quantization): 1-8 bit weights with a float scale and zero per group.

Precision options: {"nbits": 4, "group_size": 64}. transformers 5.24's HqqHfQuantizer has no
weight-conversion op, so `from_pretrained(quantization_config=HqqConfig(...))` raises
NotImplementedError on every device (`LOAD_REASON`); the hqq package itself quantizes and runs
on CPU (HQQLinear, PyTorch backend). `quantized_weight` counts HQQLinear modules either way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.backends.quantizers import PlannedLinear
from harness.registry import PRECISIONS, Precision

LOAD_REASON = PRECISIONS["hqq-int4"].device_reasons["cpu"]
# hqq 0.2 (core/quantize.py, core/bitpack.py), checked on HQQLinear on CPU: with axis=1 (HqqConfig's
# default) the weight is grouped as (numel / group, group); the codes are packed along the groups,
# codes per word and word bytes by width (3-bit: 10 per int32, padded to a multiple of 10 groups);
# scale and zero: one each per group at the compute dtype; the bias is cast to the compute dtype.
PACKING = {8: (1, 1), 4: (2, 1), 3: (10, 4), 2: (4, 1), 1: (8, 1)}  # bits -> (codes per word, word bytes)


def quantization_config(precision: Precision, compute_dtype: torch.dtype) -> Any:
    """HqqConfig(nbits, group_size) from the precision's options."""
    from transformers import HqqConfig

    options = precision.options
    return HqqConfig(nbits=options["nbits"], group_size=options["group_size"])


def quantized_weight(module: torch.nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    """An HQQLinear: (rows x columns of the original weight, packed W_q + every tensor in its meta:
    scale and zero, or, with quant_scale/quant_zero, their packed form and nested meta)."""
    if type(module).__name__ != "HQQLinear" or getattr(module, "W_q", None) is None:
        return None
    meta = module.meta
    shape = meta["shape"]
    return int(torch.Size(shape).numel()), [module.W_q, *_meta_tensors(meta)]


def _meta_tensors(meta: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor in an HQQ meta dict, nested meta dicts (meta_scale, meta_zero) included."""
    found: list[torch.Tensor] = []
    for value in meta.values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            found += _meta_tensors(value)
    return found


def planned_bytes(precision: Precision, linear: PlannedLinear) -> int | None:
    """Bytes of one nn.Linear as an HQQLinear (None for transformers' Conv1D, which HQQ leaves)."""
    if linear.conv1d:
        return None
    nbits, group = int(precision.options["nbits"]), int(precision.options["group_size"])
    per_word, word_bytes = PACKING[nbits]
    groups = math.ceil(linear.numel / group)
    packed = math.ceil(groups / per_word) * group * word_bytes
    return packed + 2 * groups * linear.compute_bytes + linear.bias * linear.compute_bytes
