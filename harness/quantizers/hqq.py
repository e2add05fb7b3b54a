"""HQQ (half-quadratic quantization): 1-8 bit weights with a float scale and zero per group.

Precision options: {"nbits": 4, "group_size": 64}. transformers 5.24's HqqHfQuantizer has no
weight-conversion op, so `from_pretrained(quantization_config=HqqConfig(...))` raises
NotImplementedError on every device (`LOAD_REASON`); the hqq package itself quantizes and runs
on CPU (HQQLinear, PyTorch backend). `quantized_weight` counts HQQLinear modules either way.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.registry import PRECISIONS, Precision

LOAD_REASON = PRECISIONS["hqq-int4"].device_reasons["cpu"]


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
