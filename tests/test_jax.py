"""Issue 13 item 5: Keras on JAX (KerasHub with KERAS_BACKEND=jax) as a third framework.

Every JAX combination runs in its own spawned worker through the real Runner, next to the PyTorch
fp32 reference; the backend refuses to start (or to finish loading) in a process that has imported
torch or TensorFlow, so an ok JAX record also says its worker imported neither.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.environment import collect_environment
from harness.options import RunOptions
from harness.plan.matrix import Combo, Selection
from harness.run.runner import Plan, Runner
from harness.storage import RunWriter, read_records

pytest.importorskip("jax")
MISSING = [name for name in ("keras", "keras_hub") if importlib.util.find_spec(name) is None]
if MISSING:
    pytest.skip(f"JAX tests need {', '.join(MISSING)}: pip install 'harness[jax]'", allow_module_level=True)

MODEL = "tiny-llama-trained"
JAX_PRECISIONS = ("fp32", "keras-int8", "keras-int4")
SMALL = dict(repeats=1, timing_repeats=1, min_timing_s=0.0, new_tokens=4, greedy_tokens=4, greedy_prompts=2,
             eval_tokens=512, prompt_lengths=(32,), cold=False, time_budget_s=0.3)  # fmt: skip


def run_frameworks(out: Path, frameworks: tuple[str, ...], combos: list[Combo], **options: Any) -> list[dict]:
    """Run exactly `combos` of MODEL on CPU through the real Runner and isolated workers; records read back."""
    precisions = tuple(sorted({c.precision for c in combos}))
    plan = Plan.create(Selection((MODEL,), frameworks, precisions, ("cpu",)), RunOptions(**options))
    writer = RunWriter(out, collect_environment(), "run")
    Runner(plan, writer).run(combos)
    return read_records(writer.path)


def pick(records: list[dict[str, Any]], framework: str, precision: str) -> dict[str, Any]:
    return next(r for r in records if (r["framework"], r["precision"]) == (framework, precision))


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """PyTorch fp32 (the reference) and every JAX precision here, with throughput and quality."""
    combos = [Combo(MODEL, "pytorch", "fp32", "cpu"), *(Combo(MODEL, "jax", p, "cpu") for p in JAX_PRECISIONS)]
    return run_frameworks(tmp_path_factory.mktemp("jax-run"), ("pytorch", "jax"), combos, **SMALL)


@pytest.mark.slow
def test_jax_fp32_agrees_with_pytorch_fp32(jax_run: list[dict[str, Any]]) -> None:
    """Two float32 implementations differ by rounding only (KL below 1e-9, the issue's bound)."""
    reference = pick(jax_run, "pytorch", "fp32")
    record = pick(jax_run, "jax", "fp32")
    assert reference["status"] == "ok", reference.get("error")
    assert record["status"] == "ok", record.get("error")
    numbers = {k: record[k] for k in ("kl_mean", "kl_p99", "max_abs_logit_diff", "top1_agree", "greedy_match_frac")}
    assert record["reference_precision"] == "fp32"
    assert record["kl_mean"] < 1e-9 and record["kl_p99"] < 1e-8, numbers
    assert record["max_abs_logit_diff"] <= 5e-4 and record["top1_agree"] >= 0.99, numbers
    assert record["greedy_match_frac"] == 1.0, numbers
    assert record["weight_bytes"] == pytest.approx(reference["weight_bytes"], rel=0.01)
    assert record["param_count"] == pytest.approx(reference["param_count"], rel=0.01)
    assert (record["storage_dtype"], record["compute_dtype"]) == ("float32", "float32")


@pytest.mark.slow
def test_jax_records_are_complete(jax_run: list[dict[str, Any]]) -> None:
    reference = pick(jax_run, "pytorch", "fp32")
    allowed = {"error_kind", "error", "skip_reason"}
    allowed |= {k for k, v in reference.items() if v is None and k not in reference["na_reasons"]}
    for precision in JAX_PRECISIONS:
        record = pick(jax_run, "jax", precision)
        assert record["status"] == "ok", (precision, record.get("error"))
        unexplained = {k for k, v in record.items() if v is None and k not in record["na_reasons"]} - allowed
        assert not unexplained, (precision, unexplained)
        assert record["load_s"] > 0 and record["quantizer_import_s"] > 0 and record["device_init_s"] is None
        assert record["decode_tok_s"] > 0 and record["prefill_tok_s"] > 0 and record["new_tokens"] == 4
        assert record["prefill_logits"] == reference["prefill_logits"] == "last"
        assert record["memory_bandwidth_bytes_s"] > 0 and record["decode_roofline_frac"] > 0


@pytest.mark.slow
def test_keras_quantized_on_jax_rank_by_bits(jax_run: list[dict[str, Any]]) -> None:
    """int8 loses less than int4, and both store fewer bytes than fp32, in the same Keras variables."""
    r = {p: pick(jax_run, "jax", p) for p in JAX_PRECISIONS}
    assert r["keras-int8"]["kl_mean"] < r["keras-int4"]["kl_mean"], {p: r[p]["kl_mean"] for p in r}
    assert r["fp32"]["weight_bytes"] > r["keras-int8"]["weight_bytes"] > r["keras-int4"]["weight_bytes"]
    for precision, storage in (("keras-int8", "int8"), ("keras-int4", "int4")):
        record = r[precision]
        assert record["storage_dtype"] == storage and record["quantized_param_frac"] > 0.9
        assert 0 < record["quant_state_bytes"] < record["weight_bytes"]
        assert record["param_count"] == r["fp32"]["param_count"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow: pip install 'harness[tf]'"
)
def test_weight_bytes_equal_tensorflow_for_the_same_precision(tmp_path: Path) -> None:
    """The same Keras variables after the same from_preset and quantize(), whatever runs them."""
    combos = [Combo(MODEL, f, p, "cpu") for f in ("tensorflow", "jax") for p in ("bf16", "keras-int8", "keras-int4")]
    records = run_frameworks(tmp_path, ("tensorflow", "jax"), combos, repeats=1, throughput=False, quality=False)
    for precision in ("bf16", "keras-int8", "keras-int4"):
        tf_record, jax_record = pick(records, "tensorflow", precision), pick(records, "jax", precision)
        assert tf_record["status"] == jax_record["status"] == "ok", (tf_record.get("error"), jax_record.get("error"))
        fields = ("weight_bytes", "param_count", "quant_state_bytes", "quantized_modules", "storage_dtype")
        assert {f: jax_record[f] for f in fields} == {f: tf_record[f] for f in fields}, precision


# Runs in a fresh interpreter: what the JAX worker imports, and that its timed prefill and decode
# follow the full forward. TensorFlow is installed beside jax here (the tf extra).
ISOLATION_SCRIPT = """
import json, sys
import numpy as np
from harness.backends import LoadSpec, backend_for

backend = backend_for("jax", LoadSpec(source=sys.argv[1], kind="causal-lm", precision="fp32", device="cpu"))
before = set(sys.modules)
backend.prepare()
after_prepare = set(sys.modules)
backend.load()
ids = np.arange(3, 3 + 2 * 24).reshape(2, 24) % 1000
last, full = backend.next_token_logits(ids), backend.logits(ids)
print(json.dumps({
    "foreign": [m for m in ("torch", "tensorflow", "transformers") if sys.modules.get(m) is not None],
    "prepare_imported": len(after_prepare - before),
    "load_imported": sorted(set(sys.modules) - after_prepare),
    "max_diff_vs_full": float(np.abs(last - full[:, -1]).max()),
    "generated_first": backend.generate(ids, 2)[:, 0].tolist(),
    "argmax_full_last": full[:, -1].argmax(-1).tolist(),
}))
"""


@pytest.mark.slow
def test_jax_worker_imports_neither_torch_nor_tensorflow(tiny_llama_dir: Path) -> None:
    run = subprocess.run([sys.executable, "-c", ISOLATION_SCRIPT, str(tiny_llama_dir)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["foreign"] == []
    assert result["prepare_imported"] > 10 and result["load_imported"] == []
    assert result["max_diff_vs_full"] <= 1e-4
    assert result["generated_first"] == result["argmax_full_last"]


def test_jax_backend_refuses_a_process_with_torch() -> None:
    code = (
        "import torch; from harness.backends import LoadSpec, backend_for\n"
        "try:\n    backend_for('jax', LoadSpec('x', 'causal-lm', 'fp32', 'cpu'))\n"
        "except RuntimeError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "torch is imported in this jax worker" in out.stdout
