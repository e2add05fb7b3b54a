"""The memory plan (harness.plan.memplan) against public configs, real loads and real caches."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from harness.environment import cpu_info, cpu_runs_bf16_well
from harness.errors import UsageError
from harness.plan.memplan import (
    GIB,
    MemoryPlan,
    plan_memories,
    plan_memory,
    quality_bytes,
    read_config,
)
from harness.registry import DEFAULT_PRECISIONS
from harness.zoo import DEFAULT_MODELS, ensure_built
from harness.zoo.archs import (
    CAUSAL_ARCHS,
    ENCODER_DECODER_ARCHS,
    arch_config,
    build_arch_checkpoint,
    build_large_vocab_llama,
)

CONFIGS = Path(__file__).parent / "data" / "configs"
# Parameter counts of the public checkpoints (tied embeddings once; BERT as BertModel with pooler,
# which is how the harness loads an encoder).
PUBLIC_PARAM_COUNTS = {
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "phi-3-mini": 3_821_079_552,
    "gpt2": 124_439_808,
    "bert-base": 109_482_240,
}
WEIGHT_TOLERANCE = 0.02


def config_of(name: str) -> dict[str, Any]:
    return read_config(str(CONFIGS / name))


def plans(name: str, **kwargs: Any) -> dict[str, MemoryPlan]:
    """Plans of a public config for a GPU that runs bf16 natively (the usual target)."""
    kwargs = {"fast_bf16": True, "device": "cuda", **kwargs}
    return dict(zip(DEFAULT_PRECISIONS, plan_memories(config_of(name), DEFAULT_PRECISIONS, **kwargs), strict=True))


# --- public configs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLIC_PARAM_COUNTS))
def test_public_configs_give_their_known_parameter_counts(name: str) -> None:
    bf16 = plans(name)["bf16"]
    assert bf16.param_count == PUBLIC_PARAM_COUNTS[name]
    # bf16: two bytes per parameter plus small buffers (rotary inv_freq, BERT's position ids)
    assert 2 * bf16.param_count <= bf16.weight_bytes < 2 * bf16.param_count * 1.001


def test_llama_3_8b_sizes_and_fit() -> None:
    by_precision = plans("llama-3-8b")
    assert by_precision["bf16"].weight_bytes == pytest.approx(16.06e9, rel=0.005)
    assert by_precision["fp32"].weight_bytes == pytest.approx(2 * by_precision["bf16"].weight_bytes, rel=1e-6)
    assert by_precision["nf4"].weight_bytes < 6 * GIB
    assert by_precision["nf4-dq"].weight_bytes < 6e9
    assert by_precision["fp32"].peak_bytes > 24 * GIB
    assert by_precision["nf4"].peak_bytes < 8 * GIB
    assert by_precision["int8"].weight_bytes < by_precision["bf16"].weight_bytes
    assert "lm_head" in by_precision["nf4"].notes
    assert by_precision["nf4"].quantized_param_frac == pytest.approx(0.869, abs=0.001)


def test_llama_3_8b_4bit_bytes_match_a_hand_count() -> None:
    """Hand counts from bitsandbytes' documented layout (blocksize 64, fp32 absmax, a 16-entry fp32
    code per layer; double quantization: uint8 absmax, an fp32 absmax per 256 of them, a 256-entry
    map and an offset per layer), not from the harness's constants; embeddings, lm_head and norms
    stay at 2 bytes. Real loads check the same layout in test_unpacked_bitsandbytes_layout_*."""
    by_precision = plans("llama-3-8b")
    hidden, inter, layers, vocab, kv_dim = 4096, 14336, 32, 128256, 8 * 128
    per_layer = [hidden * hidden, hidden * kv_dim, hidden * kv_dim, hidden * hidden, *[hidden * inter] * 3]
    kept = 2 * (2 * vocab * hidden + (2 * layers + 1) * hidden)
    rotary = 2 * 64 * 4  # inv_freq and original_inv_freq, fp32
    nf4 = sum(n // 2 + (n // 64) * 4 + 64 for n in per_layer) * layers
    assert by_precision["nf4"].weight_bytes == nf4 + kept + rotary
    double = sum(n // 2 + 64 + n // 64 + -(-(n // 64) // 256) * 4 + 1024 + 4 for n in per_layer) * layers
    assert by_precision["nf4-dq"].weight_bytes == double + kept + rotary
    int8 = sum(
        n + rows * 4 for n, rows in zip(per_layer, [hidden, kv_dim, kv_dim, hidden, inter, inter, hidden], strict=True)
    )
    assert by_precision["int8"].weight_bytes == int8 * layers + kept + rotary


def test_tied_embeddings_count_once_and_sliding_windows_cap_the_cache() -> None:
    qwen = plans("qwen2.5-0.5b")["bf16"]
    assert qwen.weight_bytes < 2 * (494_032_768 + 151_936 * 896)  # not the untied size
    mistral = config_of("mistral-7b")
    short = plan_memory(mistral, "bf16", fast_bf16=True, prompt_tokens=128, new_tokens=8000)
    window = plan_memory(mistral, "bf16", fast_bf16=True, prompt_tokens=128, new_tokens=4096 - 128)
    assert short.kv_cache_bytes == window.kv_cache_bytes  # 4096-token window


def test_kv_cache_and_activation_formulas() -> None:
    llama = plan_memory(config_of("llama-3-8b"), "bf16", fast_bf16=True, batch_size=2, logits_tokens=256)
    assert llama.kv_cache_bytes == 2 * 32 * 8 * 128 * 2 * (128 + 64) * 2  # GQA: 8 KV heads
    # two fp32 [256, vocab] chunks (candidate, reference rows) + five [32, vocab] float64 blocks
    assert llama.activation_bytes == 128_256 * (2 * 256 * 4 + 5 * 32 * 8)
    no_quality = plan_memory(config_of("llama-3-8b"), "bf16", fast_bf16=True, batch_size=2, logits_tokens=0)
    assert no_quality.activation_bytes == 2 * 128_256 * 4  # the step logits only (--no-quality)
    assert no_quality.peak_bytes == llama.peak_bytes - llama.activation_bytes + no_quality.activation_bytes
    gpt2 = plan_memory(config_of("gpt2"), "fp32", fast_bf16=False)
    assert gpt2.kv_cache_bytes == 2 * 12 * 12 * 64 * (128 + 64) * 4  # n_layer / n_head names, no KV heads
    bert = plan_memory(config_of("bert-base"), "fp32", fast_bf16=False)
    assert bert.kv_cache_bytes == 0
    assert bert.peak_bytes == bert.weight_bytes + bert.activation_bytes  # fp32 checkpoint: no conversion


def test_quantized_loads_add_the_load_transient_and_say_what_stays_unquantized() -> None:
    by_precision = plans("phi-3-mini")
    assert by_precision["bf16"].load_transient_bytes == 0  # bf16 checkpoint loaded as is
    # the largest layer bitsandbytes converts (the fused gate_up_proj), at the checkpoint's bf16;
    # the larger embedding is never quantized
    assert by_precision["nf4"].load_transient_bytes == 2 * 8192 * 3072 * 2
    assert by_precision["nf4"].peak_bytes == sum(
        getattr(by_precision["nf4"], f)
        for f in ("weight_bytes", "kv_cache_bytes", "activation_bytes", "load_transient_bytes")
    )
    assert "kept in bfloat16" in by_precision["nf4"].notes
    assert "GiB" in by_precision["nf4"].breakdown()


@pytest.mark.parametrize("arch", ENCODER_DECODER_ARCHS)
def test_encoder_decoder_configs_are_planned_without_a_cache(arch: str) -> None:
    plan = plan_memory(arch_config(arch).to_dict(), "fp32", fast_bf16=False)
    assert plan.kv_cache_bytes == 0
    assert plan.weight_bytes > 0
    assert "encoder-decoder" in plan.notes


def test_tensorflow_plans_follow_keras_quantization() -> None:
    int8, int4, fp32 = plan_memories(config_of("gpt2"), ("keras-int8", "keras-int4", "fp32"), fast_bf16=False)
    assert "Keras" in int8.notes
    assert fp32.weight_bytes == plans("gpt2")["fp32"].weight_bytes  # same tensors as PyTorch
    assert int4.weight_bytes < int8.weight_bytes < fp32.weight_bytes / 3
    # float: the 1024 x 768 learned position embedding, biases (6,912 per layer), layer norms
    float_params = 1024 * 768 + 12 * (6912 + 4 * 768) + 2 * 768
    assert int8.quantized_param_frac == pytest.approx(1 - float_params / 124_439_808, rel=1e-9)


# --- read_config ----------------------------------------------------------------------------


def test_read_config_takes_a_directory_or_the_file(tmp_path: Path) -> None:
    assert read_config(str(CONFIGS / "gpt2"))["n_embd"] == 768
    assert read_config(str(CONFIGS / "gpt2" / "config.json"))["model_type"] == "gpt2"
    with pytest.raises(UsageError, match=r"no config\.json"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"cannot read config\.json"):
        read_config(str(tmp_path))


def fake_hub_cache(root: Path, repo_id: str, config: dict[str, Any], commit: str = "a" * 40) -> Path:
    """The Hugging Face cache layout: models--org--name/refs/main and snapshots/<commit>/."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot


def test_read_config_of_a_hub_id_from_the_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    fake_hub_cache(tmp_path, "meta-llama/Meta-Llama-3-8B", config_of("llama-3-8b"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = read_config("meta-llama/Meta-Llama-3-8B")
    assert config["vocab_size"] == 128_256
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE") as missing:
        read_config("nobody/missing-model")
    assert "\n" not in str(missing.value)


# --- real loads -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real checkpoints of the architectures beyond the zoo, plus a 128k-vocab Llama."""
    root = tmp_path_factory.mktemp("archs")
    dirs = {arch: build_arch_checkpoint(arch, root / arch) for arch in (*CAUSAL_ARCHS, *ENCODER_DECODER_ARCHS)}
    dirs["llama-128k-vocab"] = build_large_vocab_llama(root / "llama-128k-vocab")
    return dirs


def fast_bf16_here() -> bool:
    return cpu_runs_bf16_well(cpu_info()[1])


@pytest.mark.slow
def test_predicted_weight_bytes_match_real_loads_through_the_runner(tmp_path: Path, arch_dirs: dict[str, Path]) -> None:
    from conftest import run_matrix

    causal = [str(arch_dirs[a]) for a in (*CAUSAL_ARCHS, "llama-128k-vocab")]
    models = (*DEFAULT_MODELS, *causal)
    records = run_matrix(tmp_path, models, DEFAULT_PRECISIONS, throughput=False, quality=False, repeats=1)
    assert len(records) == len(models) * len(DEFAULT_PRECISIONS)
    fast = fast_bf16_here()
    names = {str(arch_dirs[a]): a for a in arch_dirs}
    errors: dict[str, dict[str, float]] = {}
    for model in models:
        predicted = dict(
            zip(DEFAULT_PRECISIONS, plan_memories(read_config(model), DEFAULT_PRECISIONS, fast_bf16=fast), strict=True)
        )
        for record in (r for r in records if r["model"] == model):
            assert record["status"] == "ok", (model, record["precision"], record.get("error"))
            plan = predicted[record["precision"]]
            errors.setdefault(names.get(model, model), {})[record["precision"]] = (
                plan.weight_bytes / record["weight_bytes"] - 1
            )
            assert plan.quantized_param_frac == pytest.approx(record["quantized_param_frac"], abs=0.005)
    print(f"\npredicted / measured weight_bytes - 1 (fast_bf16={fast}):")
    print(f"{'model':20s}" + "".join(f"{p:>9s}" for p in DEFAULT_PRECISIONS))
    for model, row in errors.items():
        print(f"{model:20s}" + "".join(f"{row[p] * 100:+8.3f}%" for p in DEFAULT_PRECISIONS))
    worst = max(abs(e) for row in errors.values() for e in row.values())
    print(f"max |error| {worst * 100:.3f}%")
    assert worst <= WEIGHT_TOLERANCE


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("tensorflow", "keras", "keras_hub")),
    reason="needs tensorflow, keras and keras_hub: pip install 'harness[tf]'",
)
def test_keras_weight_bytes_match_real_tensorflow_loads(tmp_path: Path, arch_dirs: dict[str, Path]) -> None:
    """Keras quantizes kernels and token embeddings, not position embeddings; GPT-2's fused c_attn
    is three kernels there (one spawned TensorFlow worker per combination, ~10 s each)."""
    from harness.environment import collect_environment
    from harness.options import RunOptions
    from harness.plan.matrix import Selection
    from harness.run.runner import Plan, Runner
    from harness.storage import RunWriter, read_records

    models, precisions = ("tiny-gpt2", str(arch_dirs["mistral"])), ("fp16", "keras-int8", "keras-int4")
    plan = Plan.create(
        Selection(models, ("tensorflow",), precisions, ("cpu",)),
        RunOptions(throughput=False, quality=False, repeats=1, cold=False),
    )
    writer = RunWriter(tmp_path, collect_environment(), "keras")
    Runner(plan, writer).run(plan.combos())
    records = read_records(writer.path)
    assert len(records) == len(models) * len(precisions)
    for record in records:
        assert record["status"] == "ok", (record["model"], record["precision"], record.get("error"))
        (predicted,) = plan_memories(read_config(record["model"]), (record["precision"],), fast_bf16=fast_bf16_here())
        assert predicted.weight_bytes == pytest.approx(record["weight_bytes"], rel=WEIGHT_TOLERANCE / 10), record[
            "model"
        ]


def load_quantized(source: Path, precision: str, fast_bf16: bool) -> Any:
    """from_pretrained with the harness's bitsandbytes settings for a device with or without fast bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.backends.quantizers import bnb
    from harness.registry import PRECISIONS

    spec = PRECISIONS[precision]
    storage, compute = (getattr(torch, name) for name in spec.torch_dtypes(fast_bf16))
    quantization = bnb.quantization_config(spec, compute)
    return AutoModelForCausalLM.from_pretrained(
        source, dtype=storage, quantization_config=quantization, device_map="cpu"
    )


def measured_weight_bytes(model: Any) -> int:
    """The harness's byte count of a loaded model (bitsandbytes layers counted with their states)."""
    from harness.backends.quantizers import bnb, count_weights

    return count_weights(model, bnb).weight_bytes


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "nf4", "nf4-dq", "fp4"])
def test_unpacked_bitsandbytes_layout_without_fast_bf16(precision: str, arch_dirs: dict[str, Path]) -> None:
    """The layout GPUs and CPUs without AVX512-BF16 keep (fp32 absmax, nested state, fp16 storage,
    fp32 compute, biases cast to it at the first forward): bitsandbytes skips its CPU repacking
    when a layer's support_avx512bf16_for_cpu is False, as on such CPUs."""
    import torch

    for source in (ensure_built("tiny-gpt2"), arch_dirs["qwen2"]):
        model = load_quantized(source, precision, fast_bf16=False)
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        with torch.inference_mode():
            model(torch.arange(3, 19)[None])
        plan = plan_memory(read_config(str(source)), precision, fast_bf16=False, device="cpu")
        assert plan.weight_bytes == measured_weight_bytes(model), (source.name, precision)


@pytest.mark.slow
def test_keep_in_fp32_modules_and_encoder_decoder_weights(arch_dirs: dict[str, Path]) -> None:
    """T5 keeps its `wo` layers in fp32 when loaded in fp16; the plan counts them so."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    for arch in ENCODER_DECODER_ARCHS:
        for precision in ("fp32", "fp16"):
            model = AutoModelForSeq2SeqLM.from_pretrained(
                arch_dirs[arch], dtype=getattr(torch, precision.replace("fp", "float"))
            )
            plan = plan_memory(read_config(str(arch_dirs[arch])), precision, fast_bf16=False)
            assert plan.weight_bytes == measured_weight_bytes(model), (arch, precision)


def cache_storage_bytes(cache: Any) -> int:
    storages = {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_kv_cache_matches_a_real_dynamic_cache(precision: str, arch_dirs: dict[str, Path]) -> None:
    """GQA (qwen2, mistral with its sliding window), MQA with its own head_dim (gemma), GPT-2 names;
    nf4 with fp16 storage and fp32 compute keeps its cache in fp16."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt, new, batch = 300, 6, 2  # mistral's window is 256: its cache holds the prompt, then 256 tokens
    for source in (arch_dirs["qwen2"], arch_dirs["mistral"], arch_dirs["gemma"], ensure_built("tiny-gpt2")):
        if precision == "fp32":
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        else:
            model = load_quantized(source, precision, fast_bf16=False)
        config = read_config(str(source))
        ids = torch.randint(3, 1000, (batch, prompt))
        for new_tokens in (1, new):
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                )  # fmt: skip
            # generate feeds every token but the last one it returns
            plan = plan_memory(
                config, precision, fast_bf16=False, batch_size=batch, prompt_tokens=prompt, new_tokens=new_tokens - 1
            )
            cached = cache_storage_bytes(out.cache if hasattr(out, "cache") else out.past_key_values)
            if source == arch_dirs["mistral"] and new_tokens > 1:  # the plan is the peak: the prefill's 300 tokens
                window = plan_memory(
                    config, precision, fast_bf16=False, batch_size=batch, prompt_tokens=256, new_tokens=0
                )
                assert cached == window.kv_cache_bytes < plan.kv_cache_bytes
            else:
                assert cached == plan.kv_cache_bytes, (source.name, new_tokens)


@pytest.mark.slow
def test_plans_read_no_weights_import_no_bitsandbytes_and_report_their_time() -> None:
    """Plan 6 public configs x 10 precisions (every family) in a fresh interpreter; print the time
    (a benchmark). bitsandbytes (its import probes CUDA), quanto and llama.cpp are never imported;
    torchao and hqq are, by transformers itself (transformers.quantizers imports every quantizer
    integration whose library is installed), as before the family rules existed."""
    precisions = (*DEFAULT_PRECISIONS, "ao-int8wo", "quanto-int4", "gguf-q4_k_m")
    script = textwrap.dedent(
        f"""
        import sys, time
        start = time.perf_counter()
        from harness.plan.memplan import plan_memories, read_config
        times = []
        for name in {sorted(PUBLIC_PARAM_COUNTS)!r}:
            t = time.perf_counter()
            plan_memories(read_config({str(CONFIGS)!r} + "/" + name), {precisions!r}, fast_bf16=True)
            times.append(time.perf_counter() - t)
        print(f"total {{time.perf_counter() - start:.2f}} s, first config {{times[0]:.2f}} s, "
              f"others {{max(times[1:]):.3f}} s at most")
        imported = [m for m in ("bitsandbytes", "optimum.quanto", "llama_cpp", "gguf") if m in sys.modules]
        assert not imported, imported
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    print(f"\nplan of 6 configs x {len(precisions)} precisions, fresh interpreter: {result.stdout.strip()}")


# --- each family's rule, out of sample -------------------------------------------------------
# The torchao and quanto rules were read off tiny-llama-trained's layers (tests/test_quantizers.py
# hand-counts them); here they meet architectures they were not fitted on: biases (qwen2, gpt_neox,
# opt), fused projections (phi3), rows of 128 or fewer (quanto's per-row case), GPT-2's Conv1D
# (neither converts it), an encoder.
WEIGHT_ONLY_CPU = ("ao-int8wo", "ao-int8dq", "ao-fp8wo", "quanto-int8", "quanto-int4", "quanto-int2", "quanto-fp8")


def loaded_weight_bytes(source: str, precision: str, fast_bf16: bool) -> tuple[int, float]:
    """(the harness's byte count, quantized share) of a real load plus first forward, loaded as the
    harness's PyTorch backend loads it (the registry's dtypes, the family's quantization_config)."""
    import importlib

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from harness.backends.quantizers import count_weights
    from harness.plan.models import model_kind_from_config
    from harness.registry import PRECISIONS

    spec = PRECISIONS[precision]
    storage, compute = (getattr(torch, name) for name in spec.torch_dtypes(fast_bf16))
    family = importlib.import_module(spec.quantizer)
    causal = model_kind_from_config(read_config(source)) == "causal-lm"
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(
        source, dtype=storage, quantization_config=family.quantization_config(spec, compute), device_map="cpu"
    )
    with torch.inference_mode(spec.inference_mode):
        model(torch.arange(3, 19)[None])
    counted = count_weights(model, family)
    return counted.weight_bytes, counted.quantized_params / counted.param_count


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("torchao", "optimum")),
    reason="needs torchao and optimum-quanto: pip install 'harness[torchao,quanto]'",
)
def test_torchao_and_quanto_rules_match_real_loads_out_of_sample(arch_dirs: dict[str, Path]) -> None:
    fast = fast_bf16_here()
    models = {arch: str(arch_dirs[arch]) for arch in CAUSAL_ARCHS}
    models |= {"tiny-gpt2": str(ensure_built("tiny-gpt2")), "tiny-bert": str(ensure_built("tiny-bert"))}
    errors = {}
    for name, source in models.items():
        planned = dict(
            zip(WEIGHT_ONLY_CPU, plan_memories(read_config(source), WEIGHT_ONLY_CPU, fast_bf16=fast), strict=True)
        )
        for precision in WEIGHT_ONLY_CPU:
            measured, frac = loaded_weight_bytes(source, precision, fast)
            errors[(name, precision)] = planned[precision].weight_bytes - measured
            assert planned[precision].quantized_param_frac == pytest.approx(frac, abs=1e-9), (name, precision)
    print(f"\nplanned - measured weight bytes (fast_bf16={fast}): {errors}")
    assert all(error == 0 for error in errors.values()), {k: e for k, e in errors.items() if e}


def test_gguf_block_sizes_are_ggmls() -> None:
    gguf = pytest.importorskip("gguf")
    from harness.backends.quantizers.gguf import BLOCKS

    for name, size in BLOCKS.items():
        assert tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]) == size, name


def gguf_models(root: Path) -> dict[str, str]:
    """Checkpoints llama.cpp's converter takes: the zoo's Llamas (rows of 256 and of 192: k-quant
    fallbacks), a 128k-vocab Llama, and Qwen2 (biases, tied, rows of 128) and Mistral (GQA 4) built
    with a vocabulary that holds the zoo tokenizer's added token (the converter checks it)."""
    models = {name: str(ensure_built(name)) for name in ("tiny-llama", "tiny-llama-trained")}
    models["llama-128k-vocab"] = str(build_large_vocab_llama(root / "llama-128k-vocab"))
    for arch in ("qwen2", "mistral"):
        models[arch] = str(build_arch_checkpoint(arch, root / arch, vocab_size=1088))
    return models


@pytest.mark.slow
def test_gguf_rule_matches_llama_cpp_files_tensor_for_tensor(tmp_path: Path) -> None:
    """Every GGUF type of every model above: the plan's bytes equal the file's tensor data, as the
    llama.cpp backend counts weight_bytes (real conversion and llama_model_quantize, cached)."""
    pytest.importorskip("llama_cpp")
    from harness.backends.gguf import ConversionError, converter_script, gguf_file, tensor_types
    from harness.registry import PRECISIONS

    try:
        converter_script()
    except ConversionError as exc:
        pytest.skip(f"llama.cpp's converter is not available here: {exc}")
    precisions = tuple(name for name, spec in PRECISIONS.items() if spec.family == "gguf")
    for name, source in gguf_models(tmp_path).items():
        planned = plan_memories(read_config(source), precisions, fast_bf16=fast_bf16_here())
        for precision, plan in zip(precisions, planned, strict=True):
            types = tensor_types(gguf_file(source, precision).path)
            assert plan.weight_bytes == sum(size for _, size in types.values()), (name, precision)


def test_quality_activations_match_the_comparisons_traced_peak() -> None:
    """The plan's quality term against the real comparison (harness.measure.quality.CausalComparison) of
    one chunk, its numpy allocations traced: the candidate's fp32 logits, the reference's rows,
    and the float64 blocks it compares them in."""
    import tracemalloc

    import numpy as np

    from harness.measure.quality import CausalComparison
    from harness.plan.memplan import _transformers_config
    from harness.workload import CHUNK_TOKENS

    config = config_of("mistral-7b")
    vocab = config["vocab_size"]
    planned = quality_bytes(_transformers_config(config), config, CHUNK_TOKENS)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        reference = rng.standard_normal((CHUNK_TOKENS, vocab), dtype=np.float32)
        candidate = reference + np.float32(0.1)
        CausalComparison().add(reference, candidate, rng.integers(0, vocab, CHUNK_TOKENS))
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\nquality chunk, vocab {vocab}: planned {planned / 2**20:.1f} MiB, traced peak {traced / 2**20:.1f} MiB")
    assert planned == pytest.approx(traced, rel=0.1)


def test_family_rules_plan_without_their_libraries() -> None:
    """The rules are arithmetic: with bitsandbytes, torchao, optimum-quanto, hqq, llama_cpp and gguf
    unimportable, every family module still imports and plans a layer."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("bitsandbytes", "torchao", "optimum", "optimum.quanto", "hqq", "llama_cpp", "gguf"):
            sys.modules[name] = None  # import raises ImportError
        from harness.backends.quantizers import PlannedLinear, bnb, gguf, hqq, quanto, torchao
        from harness.registry import PRECISIONS
        layer = PlannedLinear(out_features=512, in_features=256, bias=512, conv1d=False, storage_bytes=2, compute_bytes=2)
        sizes = {name: module.planned_bytes(PRECISIONS[name], layer) for name, module in
                 (("nf4", bnb), ("ao-int8wo", torchao), ("quanto-int4", quanto), ("hqq-int4", hqq))}
        tensor = gguf.PlannedTensor("model.layers.0.mlp.down_proj.weight", 256, 512 * 256, "linear", 0)
        sizes["gguf-q4_0"] = gguf.planned_bytes(PRECISIONS["gguf-q4_0"], [tensor], layers=1, n_gqa=1)
        print(sizes)
        assert all(size > 0 for size in sizes.values())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_real_size_weight_rules_on_the_0_5b_checkpoint() -> None:
    """The 0.5B Qwen2-shaped checkpoint (vocab 151,936, 3 bf16 shards; `harness zoo build
    qwen-0.5b-shape`): torchao int8 and quanto int4 loads, and the GGUF Q4_K_M file (hidden 896 is
    no multiple of 256: llama.cpp falls back to Q5_0 for most tensors), against the plan."""
    from harness.zoo import zoo_dir

    source = zoo_dir() / "qwen-0.5b-shape"
    if not (source / "config.json").is_file():
        pytest.skip("build it first: harness zoo build qwen-0.5b-shape")
    fast = fast_bf16_here()
    config = read_config(str(source))
    if all(importlib.util.find_spec(name) is not None for name in ("torchao", "optimum")):
        for precision in ("ao-int8wo", "quanto-int4"):
            (plan,) = plan_memories(config, (precision,), fast_bf16=fast)
            assert plan.weight_bytes == loaded_weight_bytes(str(source), precision, fast)[0], precision
    if importlib.util.find_spec("llama_cpp") is not None:
        from harness.backends.gguf import gguf_file, tensor_types

        (plan,) = plan_memories(config, ("gguf-q4_k_m",), fast_bf16=fast)
        types = tensor_types(gguf_file(str(source), "gguf-q4_k_m").path)
        assert plan.weight_bytes == sum(size for _, size in types.values())


def test_pre_quantized_checkpoints_use_their_family_rule_or_say_they_are_estimated() -> None:
    saved_nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    config = config_of("llama-3-8b") | {"quantization_config": saved_nf4}
    as_saved, nf4 = plan_memories(config, ("as-saved", "nf4"), fast_bf16=True, device="cuda")
    assert as_saved.weight_bytes == nf4.weight_bytes and "estimate" not in as_saved.notes
    gptq = config_of("llama-3-8b") | {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    (estimated,) = plan_memories(gptq, ("as-saved",), fast_bf16=True, device="cuda")
    assert "estimate: 4 bits per weight" in estimated.notes
    assert nf4.weight_bytes * 0.9 < estimated.weight_bytes < nf4.weight_bytes * 1.1
