"""Pre-quantized checkpoints: loaded as saved (`as-saved`), compared with a separate full-precision
reference model (--reference-model), and named by method, bits and group size."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import run_matrix
from harness.plan.models import ModelSource, describe_quantization, precision_model_reason
from harness.registry import PRECISIONS
from harness.zoo import ensure_built

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def save_quantized(source: Path, out: Path, precision: str) -> Path:
    """Load `source` at a registry precision and save it with save_pretrained before any forward
    (bitsandbytes repacks 4-bit layers for AVX512-BF16 CPUs at the first forward; that layout does
    not round-trip), in a fresh interpreter, as a user would."""
    code = f"""
import torch
from transformers import AutoModelForCausalLM
from harness.registry import PRECISIONS
from harness.registry import load_object
spec = PRECISIONS[{precision!r}]
storage, compute = (getattr(torch, n) for n in spec.torch_dtypes(False))
config = load_object(spec.quantizer).quantization_config(spec, compute)
model = AutoModelForCausalLM.from_pretrained({str(source)!r}, dtype=storage, quantization_config=config,
                                             device_map="cpu")
model.save_pretrained({str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out / name)
    return out


def test_describe_quantization_names_method_bits_and_group() -> None:
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert describe_quantization({"quantization_config": bnb}) == "bitsandbytes, nf4, 4-bit"
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    assert describe_quantization({"quantization_config": gptq}) == "gptq, 4-bit, group 128"
    assert describe_quantization({"model_type": "llama"}) is None


def test_as_saved_needs_a_prequantized_checkpoint_and_vice_versa() -> None:
    plain = ModelSource("plain", "/x", "causal-lm", "llama", True)
    saved = ModelSource("saved", "/y", "causal-lm", "llama", True, quantization="bitsandbytes, nf4, 4-bit")
    assert "no quantization_config" in (precision_model_reason("pre-quantized", plain) or "")
    assert "--precisions as-saved" in (precision_model_reason("bitsandbytes", saved) or "")
    assert precision_model_reason("pre-quantized", saved) is None
    assert precision_model_reason("float", plain) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "method", "max_kl"),
    [("nf4", "bitsandbytes, nf4, 4-bit", 5 * 4.7e-4), ("ao-int8wo", "torchao, Int8WeightOnlyConfig", 1e-4)],
)
def test_saved_checkpoint_runs_as_saved_against_its_reference_model(
    tmp_path: Path, precision: str, method: str, max_kl: float
) -> None:
    pytest.importorskip(PRECISIONS[precision].packages[0])
    source = ensure_built("tiny-llama-trained")
    saved = save_quantized(source, tmp_path / f"tiny-llama-{precision}", precision)
    records = run_matrix(
        tmp_path / "runs", (str(saved),), ("as-saved", "fp32"), throughput=False, repeats=1,
        reference_model="tiny-llama-trained",
    )  # fmt: skip
    by_precision: dict[str, dict[str, Any]] = {r["precision"]: r for r in records}
    fp32 = by_precision["fp32"]
    assert fp32["status"] == "skipped" and "already quantized" in fp32["skip_reason"]
    record = by_precision["as-saved"]
    assert record["status"] == "ok", record.get("error")
    assert record["quantization"].startswith(method), record["quantization"]
    assert record["reference_model"] == "tiny-llama-trained" and record["reference_precision"] == "fp32"
    assert record["quantized_modules"] == 28  # every Linear but lm_head, counted by the saving family
    # the saved weights are those the precision produces: a small, nonzero loss against fp32
    assert 1e-7 < record["kl_mean"] < max_kl
    assert record["weight_bytes"] < 0.5 * 7_871_360  # fp32 tiny-llama-trained
