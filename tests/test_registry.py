"""The registry is the one place a framework or precision is declared: everyone reads it, and one
entry adds a precision end to end."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.checks import TOLERANCE_MARGIN, default_tolerance
from harness.cli import precision_table
from harness.plan.matrix import is_installed
from harness.registry import (
    DEFAULT_PRECISIONS,
    FRAMEWORKS,
    PRECISIONS,
    REFERENCE_FRAMEWORK,
    Framework,
    Precision,
    family_of,
    precision_order,
)
from harness.report.printers import markdown

ROOT = Path(__file__).resolve().parents[1]


def test_every_entry_names_what_exists() -> None:
    for precision in PRECISIONS.values():
        assert set(precision.frameworks) <= set(FRAMEWORKS), precision.name
        installed = all(is_installed(p) for p in precision.packages)
        if precision.quantizer and installed and "pytorch" in precision.frameworks:
            module = importlib.import_module(precision.quantizer)
            assert callable(module.quantization_config) and callable(module.quantized_weight), precision.name
    for framework in FRAMEWORKS.values():
        module_name = framework.backend.partition(":")[0]
        assert (ROOT / (module_name.replace(".", "/") + ".py")).is_file(), framework.backend
    assert FRAMEWORKS[REFERENCE_FRAMEWORK].reference and set(DEFAULT_PRECISIONS) <= set(PRECISIONS)


def test_descriptors_are_validated_on_creation() -> None:
    with pytest.raises(ValueError, match="device kind"):
        Precision("x", "float", "x", ("pytorch",), 32, devices=("tpu",))
    with pytest.raises(ValueError, match="storage_dtype"):
        Precision("x", "float", "x", ("pytorch",), 32, storage_dtype="int3")
    with pytest.raises(ValueError, match="module:Class"):
        Framework("x", "x", ("x",), "x", "no_colon", "spawn", "import x", ("cpu",))


def test_tolerances_order_and_family_come_from_the_entries() -> None:
    nf4 = PRECISIONS["nf4"]
    assert default_tolerance("kl_mean", "nf4") == pytest.approx(nf4.measured_loss["kl_mean"] * TOLERANCE_MARGIN)
    assert default_tolerance("kl_mean", "no-such-precision") == float("inf")
    assert precision_order("fp32") < precision_order("nf4") < precision_order("no-such-precision")
    assert family_of("int8") == "bitsandbytes" and family_of("fp16") == "float" and family_of("?") == "unknown"
    assert nf4.torch_dtypes(fast_bf16=True) == ("bfloat16", "bfloat16")
    assert nf4.torch_dtypes(fast_bf16=False) == ("float16", "float32")


def test_readme_lists_every_precision_as_the_registry_declares_it() -> None:
    table = markdown(*precision_table())
    assert table in (ROOT / "README.md").read_text(), "regenerate it: harness precisions --format md"


PLUGIN = """
from harness.registry import Precision

PRECISIONS = (
    Precision("fp4-dq", "bitsandbytes", "4-bit FP4 with double quantization (a test's entry)", ("pytorch",), 4,
              packages=("bitsandbytes",), extra="quant", devices=("cpu", "cuda"), storage_dtype="half",
              compute_dtype="half-or-float32", quantizer="harness.backends.quantizers.bnb",
              options={"quant_type": "fp4", "double_quant": True}),
)
"""


@pytest.mark.slow
def test_one_registry_entry_adds_a_precision_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "extra_precisions.py").write_text(PLUGIN)
    env = os.environ | {"HARNESS_PLUGINS": "extra_precisions", "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "harness.cli", "run", "--models", "tiny-llama-trained", "--precisions",
               "fp32,fp4-dq", "--no-throughput", "--no-cold", "--repeats", "1", "--out", str(tmp_path), "--run-id", "run", "--no-report"]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=900)
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    records = {r["precision"]: r for r in map(json.loads, lines)}
    record = records["fp4-dq"]
    assert record["status"] == "ok", record.get("error")
    assert record["family"] == "bitsandbytes" and record["quantized_modules"] == 28
    assert 0 < record["kl_mean"] and record["weight_bytes"] < records["fp32"]["weight_bytes"] / 3
