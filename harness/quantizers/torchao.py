"""torchao: weight-only int8 / float8 / int4 and dynamic int8 activations, through TorchAoConfig.

Precision options: {"config": name of a torchao.quantization config class, "kwargs": its arguments}.
torchao 0.18 keeps a quantized weight as a tensor subclass (Int8Tensor, Float8Tensor, ...) whose
inner plain tensors (qdata, scale, zero_point) hold the bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.quantizers import plain_tensors
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
