"""Issue 6: TensorFlow (Keras 3 + KerasHub) as a second framework, through the real runner.

Every TensorFlow combination runs in its own spawned worker, next to the PyTorch fp32 reference
of the same model; the backend refuses to start in a process that has imported torch, so an ok
TensorFlow record also says its worker never imported torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.backends.keras_support import tensorflow_unsupported_reason
from harness.environment import collect_environment
from harness.options import RunOptions
from harness.plan.matrix import Combo, Selection
from harness.run.runner import Plan, Runner
from harness.storage import RunWriter, read_records
from harness.zoo import ensure_built

# Checked without importing TensorFlow into the test process (an import costs seconds and 650 MB).
MISSING = [name for name in ("tensorflow", "keras", "keras_hub") if importlib.util.find_spec(name) is None]
if MISSING:
    pytest.skip(f"TensorFlow tests need {', '.join(MISSING)}: pip install 'harness[tf]'", allow_module_level=True)

MODELS = ("tiny-llama", "tiny-gpt2", "minilm")
AGREEMENT_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-llama-trained")  # fp32 in both frameworks
TF_PRECISIONS = ("fp32", "fp16", "bf16", "keras-int8", "keras-int4")
SMALL = dict(repeats=1, timing_repeats=2, min_timing_s=0.0, new_tokens=8, greedy_tokens=8, greedy_prompts=2,
             eval_tokens=512, prompt_lengths=(32,), cold=False, time_budget_s=0.3)  # fmt: skip
ALWAYS_NULL = {"error_kind", "error", "skip_reason"}


def run_combos(out: Path, models: tuple[str, ...], combos: list[Combo], **options: Any) -> list[dict[str, Any]]:
    """Run exactly `combos` through the real Runner and isolated workers; records read back."""
    frameworks = tuple(sorted({c.framework for c in combos}))
    precisions = tuple(sorted({c.precision for c in combos}))
    plan = Plan.create(Selection(models, frameworks, precisions, ("cpu",)), RunOptions(**options))
    writer = RunWriter(out, collect_environment(), "run")
    Runner(plan, writer).run(combos)
    return read_records(writer.path)


def pick(records: list[dict[str, Any]], model: str, framework: str, precision: str) -> dict[str, Any]:
    return next(r for r in records if (r["model"], r["framework"], r["precision"]) == (model, framework, precision))


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each zoo model in PyTorch fp32 (the reference) and in every TensorFlow precision, on CPU,
    plus the combinations that must be skipped."""
    combos = [Combo(m, "pytorch", "fp32", "cpu") for m in MODELS]
    combos += [Combo(m, "tensorflow", p, "cpu") for m in MODELS for p in TF_PRECISIONS]
    combos += [Combo("tiny-llama-trained", f, "fp32", "cpu") for f in ("pytorch", "tensorflow")]
    combos += [Combo("tiny-llama", "tensorflow", p, "cpu") for p in ("int8", "nf4")]
    combos += [Combo("tiny-llama", "pytorch", "keras-int8", "cpu")]
    return run_combos(tmp_path_factory.mktemp("tf-run"), (*MODELS, "tiny-llama-trained"), combos, **SMALL)


@pytest.mark.slow
def test_every_tensorflow_combination_is_ok_and_complete(tf_run: list[dict[str, Any]]) -> None:
    for model in MODELS:
        reference = pick(tf_run, model, "pytorch", "fp32")
        assert reference["status"] == "ok", reference
        # Fields PyTorch leaves null without a reason (e.g. eval_tokens of encoders) may be null here too.
        allowed = ALWAYS_NULL | {k for k, v in reference.items() if v is None and k not in reference["na_reasons"]}
        for precision in TF_PRECISIONS:
            record = pick(tf_run, model, "tensorflow", precision)
            assert record["status"] == "ok", (model, precision, record.get("error"))
            unexplained = {k for k, v in record.items() if v is None and k not in record["na_reasons"]} - allowed
            assert not unexplained, (model, precision, unexplained)
            assert record["reference_precision"] == "fp32"
            assert record["import_s"] > 0 and record["load_s"] > 0 and record["weight_bytes"] > 0
            # KerasHub's import is paid before load_s; CPU has no device context to create
            assert record["quantizer_import_s"] > 0 and record["device_init_s"] is None
            assert "device_init_s" in record["na_reasons"]
            assert record["param_count"] == pytest.approx(reference["param_count"], rel=0.01)
            if record["model_kind"] == "causal-lm":
                assert record["decode_tok_s"] > 0 and record["prefill_tok_s"] > 0 and record["new_tokens"] == 8
                assert record["prefill_logits"] == reference["prefill_logits"] == "last"
            else:
                assert record["encode_samples_s"] > 0


@pytest.mark.slow
def test_tensorflow_fp32_agrees_with_pytorch_fp32(tf_run: list[dict[str, Any]]) -> None:
    """Two float32 implementations differ by rounding only. Measured on the zoo (512 and 2,048
    eval tokens, 2 CPUs, TensorFlow 2.21 / KerasHub 0.32 vs torch 2.13): kl_mean 1.0e-13 to
    1.4e-11, kl_p99 up to 5.0e-11, max |logit diff| 7.5e-6 to 5.6e-5; MiniLM 1 - cosine 7.7e-7
    (mean), 2.4e-6 (min). The bounds are about 10x the largest of those."""
    for model in AGREEMENT_MODELS:
        record = pick(tf_run, model, "tensorflow", "fp32")
        numbers = {k: record[k] for k in ("kl_mean", "kl_p99", "max_abs_logit_diff", "top1_agree")}
        assert record["kl_mean"] <= 1.5e-10 and record["kl_p99"] <= 5e-10, (model, numbers)
        assert record["max_abs_logit_diff"] <= 5e-4, (model, numbers)
        assert record["top1_agree"] >= 0.99 and record["greedy_match_frac"] == 1.0, (model, numbers)
    minilm = pick(tf_run, "minilm", "tensorflow", "fp32")
    cosine = (minilm["embed_cosine_mean"], minilm["embed_cosine_min"])
    assert 1 - cosine[0] <= 1e-5 and 1 - cosine[1] <= 3e-5 and minilm["rank_agree"] >= 0.999, cosine
    for precision in ("bf16", "keras-int8"):
        assert pick(tf_run, "minilm", "tensorflow", precision)["embed_cosine_mean"] >= 0.99


@pytest.mark.slow
def test_quantized_weight_bytes_rank_and_dtypes_are_recorded(tf_run: list[dict[str, Any]]) -> None:
    for model in MODELS:
        r = {p: pick(tf_run, model, "tensorflow", p) for p in TF_PRECISIONS}
        sizes = [r[p]["weight_bytes"] for p in ("fp32", "bf16", "keras-int8", "keras-int4")]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, (model, sizes)
        assert r["fp16"]["weight_bytes"] == r["bf16"]["weight_bytes"]
        assert r["fp32"]["weight_bytes"] == pytest.approx(
            pick(tf_run, model, "pytorch", "fp32")["weight_bytes"], rel=0.01
        )
        for precision in ("fp32", "fp16", "bf16"):
            dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
            assert (r[precision]["storage_dtype"], r[precision]["compute_dtype"]) == (dtype, dtype)
            assert r[precision]["quantized_modules"] == 0 and r[precision]["quant_state_bytes"] == 0
        for precision, storage in (("keras-int8", "int8"), ("keras-int4", "int4")):
            assert r[precision]["storage_dtype"] == storage and r[precision]["compute_dtype"] in ("float32", "bfloat16")
            assert r[precision]["quantized_modules"] > 0 and r[precision]["quantized_param_frac"] > 0.9
            assert 0 < r[precision]["quant_state_bytes"] < r[precision]["weight_bytes"]
            assert r[precision]["param_count"] == r["fp32"]["param_count"]


@pytest.mark.slow
def test_cross_framework_precisions_are_skipped_with_reasons(tf_run: list[dict[str, Any]]) -> None:
    for precision in ("int8", "nf4"):
        record = pick(tf_run, "tiny-llama", "tensorflow", precision)
        assert record["status"] == "skipped" and "bitsandbytes" in record["skip_reason"]
        assert "keras-int8" in record["skip_reason"]
    record = pick(tf_run, "tiny-llama", "pytorch", "keras-int8")
    assert record["status"] == "skipped" and "runs on tensorflow" in record["skip_reason"]


@pytest.mark.parametrize(
    ("model_type", "kind", "expected"),
    [
        ("llama", "causal-lm", None),
        ("gpt2", "causal-lm", None),
        ("mistral", "causal-lm", None),
        ("bert", "encoder", None),
        (None, "causal-lm", None),
        ("t5", "causal-lm", "KerasHub has no converter for Hugging Face model_type 't5' as a causal LM"),
        ("opt", "causal-lm", "TensorFlow runs: gemma, gemma2, gpt2, llama"),
        ("bert", "causal-lm", "KerasHub loads 'bert' only as BertBackbone, not as causal-lm"),
        ("llama", "encoder", "KerasHub loads 'llama' only as Llama3CausalLM, not as encoder"),
    ],
)
def test_unsupported_architecture_reasons(model_type: str | None, kind: str, expected: str | None) -> None:
    reason = tensorflow_unsupported_reason(model_type, kind)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


# Runs in a fresh interpreter (TensorFlow workers must not share a process with torch).
PREPARE_AND_PREFILL_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
from harness.backends.base import LoadSpec
from harness.backends.tensorflow import TensorFlowBackend

out = {}
for source, kind in json.loads(sys.argv[1]):
    backend = TensorFlowBackend(LoadSpec(source=source, kind=kind, precision="fp32", device="cpu"))
    before = set(sys.modules)
    prepared = backend.prepare()
    after_prepare = set(sys.modules)
    backend.load()
    result = {"prepared": prepared, "prepare_imported": len(after_prepare - before),
              "load_imported": sorted(set(sys.modules) - after_prepare)}
    if kind == "causal-lm":
        ids = np.arange(3, 3 + 2 * 24).reshape(2, 24) % 1000
        last, full = backend.next_token_logits(ids), backend.logits(ids)
        result["last_shape"] = list(last.shape)
        result["max_diff_vs_full"] = float(np.abs(last - full[:, -1]).max())
        # The prefill's own Python function, traced with static shapes: every logits tensor its
        # outputs depend on (what TensorFlow runs; the rest is pruned) and its [batch, positions].
        function = tf.function(backend._prefill_fn().python_function).get_concrete_function(
            tf.constant(ids, tf.int32), backend._empty_cache(*ids.shape))
        seen, stack, logits_shapes = set(), list(function.outputs), []
        while stack:
            tensor = stack.pop()
            if tensor.ref() in seen:
                continue
            seen.add(tensor.ref())
            head = "token_embedding" in tensor.op.name  # the LM head is the reversed token embedding
            if head and tensor.shape.rank == 3 and tensor.shape[-1] == full.shape[-1]:
                logits_shapes.append(tensor.shape.as_list()[:2])
            stack.extend(tensor.op.inputs)
        result["logits_shapes"] = sorted(set(map(tuple, logits_shapes)))
        result["generated_first"] = backend.generate(ids, 2)[:, 0].tolist()
        result["argmax_full_last"] = full[:, -1].argmax(-1).tolist()
    out[source] = result
print(json.dumps(out))
"""


@pytest.mark.slow
def test_prepare_imports_what_load_needs_and_prefill_keeps_the_last_logits(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """prepare() pays every import load() would make (so load_s has none); the timed prefill
    fills the cache and computes the last position's logits only, like PyTorch's logits_to_keep=1,
    in every causal architecture of keras_support that has a builder here."""
    archs = pytest.importorskip("harness.zoo.archs")
    causal = [str(tiny_llama_dir), str(ensure_built("tiny-gpt2"))]
    causal += [str(archs.build_arch_checkpoint(a, tmp_path / a)) for a in ("qwen2", "mistral", "gemma")]
    models = [
        (causal[0], "causal-lm"),
        (str(ensure_built("minilm")), "encoder"),
        *((m, "causal-lm") for m in causal[1:]),
    ]
    run = subprocess.run([sys.executable, "-c", PREPARE_AND_PREFILL_SCRIPT, json.dumps(models)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    first = results[causal[0]]
    assert first["prepared"]["quantizer_import_s"] > 0 and first["prepared"]["device_init_s"] is None
    assert first["prepare_imported"] > 10  # Keras, KerasHub and its converters were not imported before
    for source, result in results.items():
        assert result["load_imported"] == [], source
    for source in causal:
        result = results[source]
        assert result["last_shape"][0] == 2 and result["max_diff_vs_full"] <= 1e-4, (source, result)
        assert result["logits_shapes"] == [[2, 1]], (source, result["logits_shapes"])  # [2, 24]: every position
        assert result["generated_first"] == result["argmax_full_last"], source


def test_keras_support_does_not_import_tensorflow() -> None:
    code = "import sys, harness.backends.keras_support; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_torch_free_tokenizer_gives_the_same_ids(tiny_llama_dir: Path) -> None:
    """TensorFlow workers tokenize without transformers (whose AutoTokenizer imports torch)."""
    from harness.measure.quality import eval_sentences, eval_token_ids, load_tokenizer
    from harness.workload import ENCODER_MAX_TOKENS

    options = RunOptions(eval_tokens=4096)
    sentences = eval_sentences(options)[:8]
    script = (
        "import json, sys; from harness.options import RunOptions; "
        "from harness.measure.quality import eval_token_ids, load_tokenizer; "
        f"tok = load_tokenizer(sys.argv[1]); o = RunOptions(eval_tokens=4096); s = {sentences!r}; "
        f"b = tok(s, padding=True, truncation=True, max_length={ENCODER_MAX_TOKENS}, return_tensors='np'); "
        "print(json.dumps([eval_token_ids(sys.argv[1], o).tolist(), b['input_ids'].tolist(), "
        "b['attention_mask'].tolist(), 'torch' in sys.modules, 'transformers' in sys.modules]))"
    )
    import torch  # noqa: F401  (so this process takes transformers' path)

    for source in (str(tiny_llama_dir), str(ensure_built("minilm"))):
        out = subprocess.run([sys.executable, "-c", script, source], capture_output=True, text=True, check=True)
        ids, batch_ids, batch_mask, torch_loaded, transformers_loaded = json.loads(out.stdout)
        assert not torch_loaded and not transformers_loaded
        reference = load_tokenizer(source)(sentences, padding=True, truncation=True,
                                           max_length=ENCODER_MAX_TOKENS, return_tensors="np")  # fmt: skip
        assert ids == eval_token_ids(source, options).tolist()
        assert batch_ids == reference["input_ids"].tolist() and batch_mask == reference["attention_mask"].tolist()


@pytest.mark.slow
def test_checkpoints_keras_hub_cannot_load_fail_with_the_reason(tmp_path: Path) -> None:
    """An architecture without a KerasHub converter, and a BERT saved without its pooler."""
    from safetensors.numpy import load_file, save_file

    opt = tmp_path / "fake-opt"
    shutil.copytree(ensure_built("tiny-llama"), opt)
    config = json.loads((opt / "config.json").read_text())
    (opt / "config.json").write_text(json.dumps(config | {"model_type": "opt"}))
    no_pooler = tmp_path / "bert-no-pooler"
    shutil.copytree(ensure_built("tiny-bert"), no_pooler)
    tensors = load_file(no_pooler / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "pooler" not in k}, no_pooler / "model.safetensors")

    models = (str(opt), str(no_pooler))
    combos = [Combo(m, "tensorflow", "fp32", "cpu") for m in models]
    records = run_combos(tmp_path / "out", models, combos, repeats=1, throughput=False, quality=False)
    opt_record, bert_record = (pick(records, m, "tensorflow", "fp32") for m in models)
    # skipped once the runner asks keras_support first; until then the worker fails with the same reason
    assert opt_record["status"] in ("skipped", "failed")
    assert "no converter for Hugging Face model_type 'opt'" in (opt_record["skip_reason"] or opt_record["error"])
    assert bert_record["status"] == "failed" and "pooler" in bert_record["error"]
