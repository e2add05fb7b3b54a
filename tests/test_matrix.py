"""The matrix: names, ids, expansion, and the support rules' reasons."""

from __future__ import annotations

import pytest

from harness.environment import GpuInfo
from harness.errors import UsageError
from harness.plan.matrix import Capabilities, Combo, Selection, unsupported_reason

EVERYTHING = frozenset({"torch", "transformers", "bitsandbytes", "tensorflow", "keras", "keras_hub", "torch_xla"})
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 << 30, "9.0")
V100 = GpuInfo(0, "Tesla V100", 16 << 30, "7.0")


def caps(gpus=(), installed=EVERYTHING, cuda="12.8") -> Capabilities:
    return Capabilities(tuple(gpus), cuda, frozenset(installed), cpu_bf16=False)


def test_combos_expand_in_stable_order_with_readable_ids() -> None:
    selection = Selection(("tiny-llama", "minilm"), ("pytorch",), ("fp32", "nf4"), ("cpu", "cuda"))
    ids = [c.id for c in selection.combos()]
    assert ids[:4] == [
        "tiny-llama-pytorch-fp32-cpu",
        "tiny-llama-pytorch-nf4-cpu",
        "tiny-llama-pytorch-fp32-cuda",
        "tiny-llama-pytorch-nf4-cuda",
    ]
    assert len(ids) == 8 and len(set(ids)) == 8


@pytest.mark.parametrize(
    ("axis", "value", "message"),
    [
        ("precisions", "int3", "unknown precision 'int3': use one of fp32"),
        ("devices", "gpu", "unknown device 'gpu': use cpu, cuda, cuda:N or xla"),
        ("frameworks", "jaxx", "unknown framework 'jaxx': use one of pytorch"),
    ],
)
def test_unknown_axis_values_name_the_fix(axis: str, value: str, message: str) -> None:
    axes = {"models": ("tiny-llama",), "frameworks": ("pytorch",), "precisions": ("fp32",), "devices": ("cpu",)}
    axes[axis] = (value,)
    with pytest.raises(UsageError, match=message):
        Selection(**axes)


@pytest.mark.parametrize(
    ("combo", "capabilities", "reason"),
    [
        (Combo("m", "pytorch", "fp32", "cuda"), caps(), "no CUDA GPU"),
        (Combo("m", "pytorch", "fp32", "cuda:1"), caps([H100]), "cuda:1 does not exist"),
        (Combo("m", "pytorch", "int8", "cuda"), caps([V100]), "int8 needs compute capability >= 7.5"),
        (Combo("m", "pytorch", "bf16", "cuda"), caps([V100]), "bf16 needs compute capability >= 8.0"),
        (
            Combo("m", "pytorch", "nf4", "cpu"),
            caps(installed=EVERYTHING - {"bitsandbytes"}),
            "nf4 needs bitsandbytes: pip install 'harness[quant]'",
        ),
        (Combo("m", "pytorch", "fp32", "cuda"), caps([H100], cuda=None), "CPU build"),
        (
            Combo("m", "pytorch", "fp32", "xla"),
            caps(installed=EVERYTHING - {"torch_xla"}),
            "xla devices need torch_xla",
        ),
        (Combo("m", "pytorch", "nf4", "xla"), caps(), "bitsandbytes has no XLA backend"),
        (
            Combo("m", "tensorflow", "nf4", "cpu"),
            caps(),
            "nf4 (bitsandbytes) runs on pytorch only; tensorflow offers keras-int8, keras-int4",
        ),
        (Combo("m", "pytorch", "keras-int8", "cpu"), caps(), "keras-int8 (keras) runs on tensorflow, jax only"),
        (Combo("m", "tensorflow", "fp32", "cpu"), caps(installed={"torch", "transformers"}), "pip install"),
    ],
)
def test_unsupported_combinations_say_why(combo: Combo, capabilities: Capabilities, reason: str) -> None:
    assert reason in (unsupported_reason(combo, capabilities) or "")


@pytest.mark.parametrize(
    "combo",
    [
        Combo("m", "pytorch", "int8", "cuda"),
        Combo("m", "pytorch", "nf4-dq", "cuda:0"),
        Combo("m", "pytorch", "bf16", "cpu"),
        Combo("m", "tensorflow", "keras-int4", "cpu"),
    ],
)
def test_supported_combinations_have_no_reason(combo: Combo) -> None:
    assert unsupported_reason(combo, caps([H100])) is None
