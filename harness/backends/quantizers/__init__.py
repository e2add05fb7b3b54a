"""Worker-side quantizer families (each imports torch): how a precision loads and what its bytes are.

Each family module named by a registry entry's `quantizer` provides
- `quantization_config(precision, compute_dtype)`: the transformers config passed to from_pretrained;
- `quantized_weight(module)`: for a module the family quantized, (logical parameter count, every
  plain tensor holding that weight: packed data, scales, zero points, code tables), else None;
- `planned_bytes(precision, linear)`: the memory plan's rule, the bytes that family stores for one
  `PlannedLinear` (weight, quant state, bias, per-module buffers), or None for a layer it leaves as
  is. The rules are arithmetic: they never import the quantizer library (bitsandbytes' import probes
  CUDA, torchao's takes seconds), so the plan runs anywhere. GGUF (harness.backends.quantizers.gguf) plans a
  whole file instead, by llama.cpp's per-tensor type choices.

`count_weights` turns that into a model's true bytes, each storage once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch


@dataclass(frozen=True)
class PlannedLinear:
    """One nn.Linear (or transformers' Conv1D) a family may quantize, as the memory plan sees it."""

    out_features: int
    in_features: int
    bias: int  # bias elements, 0 without a bias
    conv1d: bool  # transformers' Conv1D (GPT-2), which only bitsandbytes replaces
    storage_bytes: int  # bytes per element of what stays unquantized (the registry's storage dtype)
    compute_bytes: int  # bytes per element of the compute dtype
    cpu_packed: bool = False  # bitsandbytes' AVX512-BF16 CPU layout, made at the first forward

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def plain_tensors(tensor: Any) -> Iterator[torch.Tensor]:
    """The plain tensors behind `tensor`: itself, or, for a tensor subclass (torchao, quanto), the
    inner tensors its `__tensor_flatten__` names, recursively."""
    if not isinstance(tensor, torch.Tensor):
        return
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        yield tensor
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        yield from plain_tensors(getattr(tensor, name))


@dataclass
class WeightCount:
    """A loaded model's bytes, each storage counted once."""

    weight_bytes: int
    param_count: int  # logical: a packed 4-bit weight counts its elements
    quant_state_bytes: int  # scales, zero points, code tables: floating tensors of 16+ bits the quantizer holds
    quantized_modules: int
    quantized_params: int
    quant_state_devices: tuple[str, ...]


def _key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def count_weights(model: torch.nn.Module, family: ModuleType | None) -> WeightCount:
    """Every parameter, buffer and quantizer tensor of `model`, each storage once (tied weights,
    views and shared states included once; meta tensors excluded)."""
    storages: dict[tuple[str, int], int] = {}
    quant_keys: set[tuple[str, int]] = set()
    state_keys: set[tuple[str, int]] = set()
    quantized_modules = quantized_params = 0

    def add(tensor: torch.Tensor) -> tuple[str, int] | None:
        if tensor.device.type == "meta":
            return None
        key = _key(tensor)
        storages[key] = max(storages.get(key, 0), tensor.untyped_storage().nbytes())
        return key

    for module in model.modules():
        found = family.quantized_weight(module) if family is not None else None
        if found is None:
            continue
        logical, tensors = found
        quantized_modules += 1
        quantized_params += logical
        for tensor in tensors:
            for plain in plain_tensors(tensor):
                key = add(plain)
                if key is None:
                    continue
                quant_keys.add(key)
                if plain.is_floating_point() and plain.element_size() >= 2:
                    state_keys.add(key)
    other_params = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        keys = [add(plain) for plain in plain_tensors(tensor)]
        is_param = isinstance(tensor, torch.nn.Parameter)
        if is_param and not any(key in quant_keys for key in keys if key is not None):
            other_params += tensor.numel()
    return WeightCount(
        weight_bytes=sum(storages.values()),
        param_count=other_params + quantized_params,
        quant_state_bytes=sum(storages[k] for k in state_keys),
        quantized_modules=quantized_modules,
        quantized_params=quantized_params,
        quant_state_devices=tuple(sorted({device for device, _ in quant_keys})),
    )
