"""llama.cpp through llama-cpp-python: the checkpoint converted to GGUF (f16) and quantized to the
precision's type (harness.gguf, cached), then loaded with `llama_cpp.Llama`.

Conversion and quantization happen in prepare(), outside load_s, and are reported as `convert_s`.
The harness feeds Hugging Face token ids, so prepare() also checks that the GGUF vocabulary
tokenizes the eval text to the same ids (TokenizerMismatch otherwise): misaligned logits are never
compared. Causal LMs only; one sequence at a time (a batch is run row by row).

Importing this module imports neither llama_cpp nor torch.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import LoadSpec, WeightStats
from harness.gguf import TYPES, GGUFFile, gguf_file, header_field, tensor_types, type_counts

MAX_CONTEXT = 4096  # KV cache positions allocated at load (the model's own limit when smaller)
BATCH_TOKENS = 512  # tokens per llama_decode call (n_batch)
FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})


class TokenizerMismatch(ValueError):
    """The GGUF vocabulary does not tokenize a text to the Hugging Face tokenizer's ids."""


def check_tokenizer_agrees(gguf_ids: list[int], hf_ids: list[int], piece: Callable[[int], str]) -> None:
    """Raise TokenizerMismatch, with a one-line reason, unless both tokenizations are identical."""
    if list(gguf_ids) == list(hf_ids):
        return
    index = next((i for i, (a, b) in enumerate(zip(gguf_ids, hf_ids, strict=False)) if a != b), None)
    if index is None:
        index = min(len(gguf_ids), len(hf_ids))
    gguf_token = f"{gguf_ids[index]} {piece(gguf_ids[index])!r}" if index < len(gguf_ids) else "end"
    hf_token = f"{hf_ids[index]}" if index < len(hf_ids) else "end"
    raise TokenizerMismatch(
        f"the GGUF vocabulary tokenizes the eval text differently from the Hugging Face tokenizer: "
        f"{len(gguf_ids)} vs {len(hf_ids)} tokens, first difference at token {index} "
        f"(GGUF {gguf_token}, Hugging Face {hf_token})"
    )


def gguf_tokenizes_like_hf(gguf_path: Path, tokenizer_source: str, text: str) -> None:
    """Tokenize `text` with the GGUF vocabulary (vocab-only load) and with the Hugging Face
    tokenizer of `tokenizer_source` (no special tokens either side); TokenizerMismatch if they differ."""
    import llama_cpp

    from harness.quality import load_tokenizer

    vocab = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        gguf_ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        hf_ids = list(load_tokenizer(tokenizer_source)(text, add_special_tokens=False)["input_ids"])

        def piece(token: int) -> str:
            return vocab.detokenize([token]).decode("utf-8", errors="replace")

        check_tokenizer_agrees(gguf_ids, hf_ids, piece)
    finally:
        vocab.close()


def unsupported_reason(model_type: str, kind: str) -> str | None:
    """Why llama.cpp cannot run such a model (the registry's `model_support` hook), or None.
    Architectures the converter does not know fail in prepare() with the converter's own reason."""
    if kind != "causal-lm":
        return f"the llama.cpp backend runs causal LMs only, not {kind} models"
    return None


def default_threads() -> int:
    """Half the usable CPUs, at least one: llama-cpp-python's own default (physical cores where SMT
    pairs them). ggml's threads spin at a barrier per op, so more threads than free cores collapse
    decode (measured: 1 thread 1,590 tok/s, 2 threads 3.6 tok/s on 2 busy vCPUs)."""
    import os

    return max(len(os.sched_getaffinity(0)) // 2, 1)


class LlamaCppBackend:
    """Runs a GGUF file of the checkpoint with llama.cpp, on CPU or (a CUDA build) with every layer offloaded."""

    framework = "llamacpp"

    def __init__(self, spec: LoadSpec, tokenizer_source: str | None = None, check_text: str | None = None) -> None:
        if spec.precision not in TYPES:
            raise ValueError(f"precision {spec.precision} is not a GGUF precision ({', '.join(TYPES)})")
        if spec.kind != "causal-lm":
            raise ValueError(f"llama.cpp runs causal LMs only, not {spec.kind} models")
        self.spec = spec
        self.tokenizer_source = tokenizer_source or spec.tokenizer or spec.source
        self.check_text = check_text  # None: the harness's eval text
        self.gguf: GGUFFile | None = None
        self.llm: Any = None
        self.threads = default_threads()
        self._batch: Any = None  # one llama_batch of BATCH_TOKENS, allocated at load
        self.n_ctx = 0
        self.prefill_logits: str | None = None
        self.last_timings: dict[str, float | int] = {}  # llama.cpp's own counters of the last generate

    # --- loading --------------------------------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        """Import llama_cpp, make (or find) the GGUF file, and check the tokenizer: none of it in load_s.

        Returns quantizer_import_s, device_init_s (null), convert_s (seconds spent making GGUF files
        now, 0.0 when all were cached), convert_recorded_s (what this file took when it was made),
        gguf_reused."""
        start = time.perf_counter()
        import llama_cpp

        import_s = time.perf_counter() - start
        if self.spec.device.startswith("cuda") and not llama_cpp.llama_supports_gpu_offload():
            raise RuntimeError("this llama-cpp-python build has no GPU offload: rebuild with CMAKE_ARGS=-DGGML_CUDA=on")
        if self.spec.device not in ("cpu",) and not self.spec.device.startswith("cuda"):
            raise RuntimeError(f"llama.cpp does not run on {self.spec.device} devices here")
        self.gguf = gguf_file(self.spec.source, self.spec.precision)
        from harness.corpus import eval_text

        gguf_tokenizes_like_hf(self.gguf.path, self.tokenizer_source, self.check_text or eval_text())
        return {
            "quantizer_import_s": import_s,
            "device_init_s": None,
            "convert_s": self.gguf.spent_s,
            "convert_recorded_s": self.gguf.made_s,
            "gguf_reused": self.gguf.reused,
        }

    def limit_device_memory(self, limit_bytes: int) -> None:
        """No-op: llama.cpp has no allocator cap."""

    def load(self) -> None:
        import llama_cpp

        if self.gguf is None:
            self.gguf = gguf_file(self.spec.source, self.spec.precision)
        trained = header_field(self.gguf.path, f"{header_field(self.gguf.path, 'general.architecture')}.context_length")
        self.n_ctx = min(int(trained), MAX_CONTEXT) if trained else MAX_CONTEXT
        on_gpu = self.spec.device.startswith("cuda")
        self.llm = llama_cpp.Llama(
            model_path=str(self.gguf.path),
            n_ctx=self.n_ctx,
            n_batch=min(BATCH_TOKENS, self.n_ctx),
            n_ubatch=min(BATCH_TOKENS, self.n_ctx),
            n_gpu_layers=-1 if on_gpu else 0,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=False,  # all-position logits are requested per batch in logits() only
            seed=0,
            verbose=False,
        )
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self.prefill_logits = "last"

    def synchronize(self) -> None:
        """No-op: llama_decode returns when its work is done."""

    # --- size -----------------------------------------------------------------------------

    def weight_stats(self) -> WeightStats:
        """From the GGUF header: bytes of every tensor's data, and the type each tensor actually got."""
        from gguf import GGUFReader

        assert self.gguf is not None
        tensors = GGUFReader(str(self.gguf.path)).tensors
        types = tensor_types(self.gguf.path)
        params = sum(int(t.n_elements) for t in tensors)
        quantized = {name for name, (kind, _) in types.items() if kind not in FLOAT_TYPES}
        quantized_params = sum(int(t.n_elements) for t in tensors if t.name in quantized)
        return WeightStats(
            weight_bytes=sum(n for _, n in types.values()),
            param_count=params,
            quantized_modules=len(quantized),
            quantized_param_frac=quantized_params / params if params else 0.0,
            storage_dtype=types.get("token_embd.weight", (None, 0))[0],
            compute_dtype="float32",
            architecture=str(header_field(self.gguf.path, "general.architecture")),
            quant_state_device=self.spec.device if quantized else None,
            notes={
                "tensor_types": json.dumps(type_counts(types)),
                "gguf_file": str(self.gguf.path),
                "threads": str(self.threads),
            },
        )

    def reset_device_peaks(self) -> None:
        pass

    def device_memory(self) -> dict[str, int | None]:
        return {}

    # --- running --------------------------------------------------------------------------

    def _clear(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        self.llm.reset()

    def _decode(self, tokens: np.ndarray, start_pos: int, into: np.ndarray | None = None) -> None:
        """llama_decode `tokens` at positions start_pos.. in batches of BATCH_TOKENS. With `into`
        ([tokens, vocab] float32), every position's logits are computed and copied there; else only the last's."""
        import llama_cpp

        vocab, batch = self._vocab, self._batch
        for offset in range(0, len(tokens), BATCH_TOKENS):
            part = tokens[offset : offset + BATCH_TOKENS].tolist()
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = start_pos + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = into is not None
            batch.logits[len(part) - 1] = True
            status = llama_cpp.llama_decode(self.llm.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} at position {start_pos + offset}")
            if into is not None:
                rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(len(part) * vocab,))
                into[offset : offset + len(part)] = rows.reshape(len(part), vocab)

    @property
    def _vocab(self) -> int:
        return int(self.llm.n_vocab())

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self._vocab,))

    def _check_length(self, tokens: int) -> None:
        if tokens > self.n_ctx:
            raise ValueError(f"{tokens} tokens exceed the {self.n_ctx}-position context allocated at load")

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [batch, tokens, vocab]: each row one fresh sequence, every position's logits."""
        batch, tokens = input_ids.shape
        self._check_length(tokens)
        out = np.empty((batch, tokens, self._vocab), dtype=np.float32)
        for row in range(batch):
            self._clear()
            self._decode(np.asarray(input_ids[row]), 0, into=out[row])
        return out

    def prefill(self, input_ids: np.ndarray) -> None:
        """One pass over each prompt row that fills the KV cache, computing the last position's logits."""
        self._check_length(input_ids.shape[1])
        for row in input_ids:
            self._clear()
            self._decode(np.asarray(row), 0)

    def max_positions(self) -> int | None:
        return self.n_ctx or None

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the llama.cpp backend runs causal LMs only")

    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        """Greedy (argmax) generation of exactly `new_tokens` per row, EOS included; rows run one after another.

        llama.cpp's own prompt and token-eval timings of the last row land in `last_timings`."""
        import llama_cpp

        batch, prompt = input_ids.shape
        self._check_length(prompt + new_tokens)
        out = np.empty((batch, new_tokens), dtype=np.int64)
        for row in range(batch):
            self._clear()
            llama_cpp.llama_perf_context_reset(self.llm.ctx)
            self._decode(np.asarray(input_ids[row]), 0)
            for step in range(new_tokens):
                token = int(np.argmax(self._last_logits()))
                out[row, step] = token
                if on_token is not None:
                    on_token()
                if step + 1 < new_tokens:
                    self._decode(np.array([token]), prompt + step)
            perf = llama_cpp.llama_perf_context(self.llm.ctx)
            self.last_timings = {
                "prompt_ms": perf.t_p_eval_ms,
                "prompt_tokens": perf.n_p_eval,
                "eval_ms": perf.t_eval_ms,
                "eval_tokens": perf.n_eval,
            }
        return out

    def llamacpp_decode_tok_s(self) -> float | None:
        """llama.cpp's own decode rate of the last generate (single-token evals / their time)."""
        timings = self.last_timings
        if not timings or not timings["eval_ms"]:
            return None
        return timings["eval_tokens"] / (timings["eval_ms"] / 1000)

    def roundtrip_max_abs_diff(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> float:
        raise NotImplementedError("GGUF files are the serialized form")

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        """Copy bandwidth of the memory the weights live in: host memory on CPU, device memory on CUDA."""
        from harness.trackers import copy_bandwidth_bytes_s

        if self.spec.device.startswith("cuda"):
            import torch

            src = torch.ones(size_bytes // 4, dtype=torch.float32, device="cuda")
            dst = torch.empty_like(src)
            return copy_bandwidth_bytes_s(lambda: dst.copy_(src), torch.cuda.synchronize, size_bytes)
        host_src = np.ones(size_bytes // 4, dtype=np.float32)
        host_dst = np.empty_like(host_src)
        return copy_bandwidth_bytes_s(lambda: np.copyto(host_dst, host_src), self.synchronize, size_bytes)
