"""Pre-quantized checkpoints (`as-saved`): loaded with the quantization_config they were saved with;
their bytes are counted by the family module of the quantizer that produced them."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from harness.registry import PRECISIONS, Precision


def quantization_config(precision: Precision, compute_dtype: torch.dtype) -> Any:
    """None: from_pretrained reads the checkpoint's own quantization_config."""
    return None


def family_for(quant_method: str | None) -> ModuleType | None:
    """The registry family module whose name is the checkpoint's quant_method (bitsandbytes, torchao,
    quanto, hqq), or None for a method the harness cannot count (e.g. gptq: only its parameters count)."""
    for spec in PRECISIONS.values():
        if spec.family == quant_method and spec.quantizer:
            return importlib.import_module(spec.quantizer)
    return None


def quantized_weight(module: torch.nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    """Nothing before the load: the backend replaces this module by `family_for(quant_method)`."""
    return None
