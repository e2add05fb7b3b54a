"""bitsandbytes: LLM.int8() and 4-bit NF4/FP4 (with or without double quantization)."""

from __future__ import annotations

from typing import Any

import torch

from harness.registry import Precision


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
