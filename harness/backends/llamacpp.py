"""llama.cpp through llama-cpp-python: the checkpoint converted to GGUF (f16) and quantized to the
precision's type (harness.backends.gguf, cached), then loaded through llama.cpp's C API
(llama_model_load_from_file, llama_init_from_model, llama_decode).

Conversion and quantization happen in prepare(), outside load_s, and are reported as `convert_s`;
so does the device's start (CUDA: ggml's backend registry and the GPU's context, `device_init_s`).
The harness feeds Hugging Face token ids, so prepare() also checks that the GGUF vocabulary
tokenizes the eval text to the same ids (TokenizerMismatch otherwise): misaligned logits are never
compared. Causal LMs only; a batch's rows are sequences of one context, decoded together.

Importing this module imports neither llama_cpp nor torch.
"""

from __future__ import annotations

import ctypes
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import LoadSpec, WeightStats
from harness.backends.gguf import TYPES, GGUFFile, gguf_file, header_fields, tensor_types, type_counts

MAX_CONTEXT = 4096  # KV cache positions per sequence (the model's own limit when smaller)
BATCH_TOKENS = 512  # tokens per llama_decode call (n_batch)
FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})
GGML_DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel")  # enum ggml_backend_dev_type, in order


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

    from harness.measure.quality import load_tokenizer

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


@dataclass(frozen=True)
class GgmlDevice:
    """One device ggml's backend registry lists (the devices llama.cpp can place a model on)."""

    index: int  # in ggml's registry
    name: str  # e.g. CPU, CUDA0
    description: str
    kind: str  # cpu | gpu | igpu | accel


def _libggml() -> ctypes.CDLL:
    """ggml's shared library as llama-cpp-python loaded it, with the device API's signatures."""
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = (ctypes.c_size_t,)
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).argtypes = (ctypes.c_void_p,)
        getattr(lib, name).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = (ctypes.c_void_p,)
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t))  # fmt: skip
    lib.ggml_backend_dev_memory.restype = None
    return lib


def ggml_devices() -> list[GgmlDevice]:
    """Every device in ggml's backend registry (the first call loads the backends: CUDA's initializes
    the driver, but creates no context)."""
    lib = _libggml()
    devices = []
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        kind = lib.ggml_backend_dev_type(device)
        devices.append(GgmlDevice(
            index, lib.ggml_backend_dev_name(device).decode(), lib.ggml_backend_dev_description(device).decode(),
            GGML_DEVICE_KINDS[kind] if 0 <= kind < len(GGML_DEVICE_KINDS) else f"type {kind}",
        ))  # fmt: skip
    return devices


def ggml_device_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of ggml device `index`. On a CUDA device this is cudaMemGetInfo, which
    creates the device's CUDA context: the call llama.cpp's own load makes first."""
    lib = _libggml()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(lib.ggml_backend_dev_get(index), ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def offload_device(device: str, devices: list[GgmlDevice]) -> tuple[int, GgmlDevice]:
    """For `cuda` / `cuda:N`: (N, the ggml device llama.cpp's main_gpu = N selects with split mode
    NONE: the N-th GPU, integrated GPUs only where there is none)."""
    number = int(device.partition(":")[2] or 0)
    gpus = [d for d in devices if d.kind == "gpu"] or [d for d in devices if d.kind == "igpu"]
    if number >= len(gpus):
        listed = ", ".join(f"{d.name} ({d.kind})" for d in devices)
        raise RuntimeError(f"{device}: llama.cpp sees {len(gpus)} GPU(s) ({listed})")
    return number, gpus[number]


@dataclass
class _Handles:
    """What llama.cpp allocated for one backend, freed together when the backend goes."""

    model: Any = None  # llama_model *
    ctx: Any = None  # llama_context *
    batch: Any = None  # llama_batch

    def free_context(self) -> None:
        if self.ctx:
            import llama_cpp

            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def free(self) -> None:
        if self.batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.free_context()
        if self.model:
            import llama_cpp

            llama_cpp.llama_model_free(self.model)
            self.model = None


class LlamaCppBackend:
    """Runs a GGUF file of the checkpoint with llama.cpp's C API, on CPU or (a CUDA build) with every
    layer on one GPU. A batch of B rows runs as B sequences of one context, decoded together: the
    load makes a context for one sequence; the first prefill or generate of a larger batch replaces
    it with one for B (llama.cpp's per-sequence KV streams, kv_unified off, so no sequence attends
    over another's cells), which a warm-up call pays."""

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
        self.on_gpu = spec.device.startswith("cuda")
        self.gpu: tuple[int, GgmlDevice] | None = None  # (main_gpu, its ggml device), set by prepare on cuda
        self._handles = _Handles()
        weakref.finalize(self, self._handles.free)
        self.sequences = 0  # sequences the current context holds
        self.threads = default_threads()
        self.n_positions = 0  # positions per sequence: min(the model's context, MAX_CONTEXT)
        self.n_vocab = 0
        self.architecture: str | None = None
        self.prefill_logits: str | None = None
        self.last_timings: dict[str, float | int] = {}  # llama.cpp's own counters of the last generate

    # --- loading --------------------------------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        """Everything before the load clock: import llama_cpp, start the device (CUDA: ggml's backend
        registry and the GPU's context), make (or find) the GGUF file, read its header, check the tokenizer.

        Returns quantizer_import_s, device_init_s (CUDA only), convert_s (seconds spent making GGUF
        files now, 0.0 when all were cached), convert_recorded_s (what this file took when it was
        made), gguf_reused."""
        start = time.perf_counter()
        import llama_cpp

        import_s = time.perf_counter() - start
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log: errors only
        device_init_s = None
        if self.on_gpu:
            start = time.perf_counter()
            llama_cpp.llama_backend_init()
            if not llama_cpp.llama_supports_gpu_offload():
                raise RuntimeError(
                    "this llama-cpp-python build has no GPU offload: rebuild with CMAKE_ARGS=-DGGML_CUDA=on"
                )
            self.gpu = offload_device(self.spec.device, ggml_devices())
            ggml_device_memory(self.gpu[1].index)
            device_init_s = time.perf_counter() - start
        elif self.spec.device != "cpu":
            raise RuntimeError(f"llama.cpp does not run on {self.spec.device} devices here")
        else:
            llama_cpp.llama_backend_init()
        self.gguf = gguf_file(self.spec.source, self.spec.precision)
        self.architecture, trained = header_fields(self.gguf.path, "general.architecture", "{}.context_length")
        self.n_positions = min(int(trained), MAX_CONTEXT) if trained else MAX_CONTEXT
        from harness.corpus import eval_text

        gguf_tokenizes_like_hf(self.gguf.path, self.tokenizer_source, self.check_text or eval_text())
        return {
            "quantizer_import_s": import_s,
            "device_init_s": device_init_s,
            "convert_s": self.gguf.spent_s,
            "convert_recorded_s": self.gguf.made_s,
            "gguf_reused": self.gguf.reused,
        }

    def weight_files(self) -> list[Path]:
        """The files load() reads: the GGUF file (not the checkpoint it was converted from)."""
        if self.gguf is None:
            raise RuntimeError("prepare() makes the GGUF file: call it first")
        return [self.gguf.path]

    def limit_device_memory(self, limit_bytes: int) -> None:
        """No-op: llama.cpp has no allocator cap."""

    def load(self) -> None:
        """llama_model_load_from_file (memory-mapped), and a context with a KV cache of MAX_CONTEXT
        positions (the model's limit when smaller) for one sequence: the span load_s times."""
        import llama_cpp

        if self.gguf is None:
            raise RuntimeError("prepare() makes the GGUF file: call it before load()")
        model_params = llama_cpp.llama_model_default_params()
        model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP  # llama-cpp-python's default (use_mmap)
        model_params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        model_params.main_gpu = self.gpu[0] if self.gpu else -1  # -1: no device at all, the CPU computes everything
        model_params.n_gpu_layers = 0x7FFFFFFF if self.gpu else 0
        model = llama_cpp.llama_model_load_from_file(str(self.gguf.path).encode(), model_params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.gguf.path}")
        self._handles.model = model
        self._handles.batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        self._new_context(1)
        self.prefill_logits = "last"

    def _new_context(self, sequences: int) -> None:
        """Replace the context by one for `sequences` sequences of n_positions each (its own KV
        cells per sequence)."""
        import llama_cpp

        self._handles.free_context()
        self.sequences = 0
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_positions * sequences
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = sequences
        params.kv_unified = False  # one KV stream per sequence: no cross-sequence attention
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # llama-cpp-python's default
        params.no_perf = False
        ctx = llama_cpp.llama_init_from_model(self._handles.model, params)
        if not ctx:
            raise ValueError(f"Failed to create llama_context ({sequences} sequences x {self.n_positions} positions)")
        self._handles.ctx, self.sequences = ctx, sequences

    @property
    def ctx(self) -> Any:
        """The current llama_context * (None before load)."""
        return self._handles.ctx

    def synchronize(self) -> None:
        """llama_synchronize: wait for the context's queued work (llama_decode is asynchronous on a GPU)."""
        if self.ctx is not None:
            import llama_cpp

            llama_cpp.llama_synchronize(self.ctx)

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
            architecture=self.architecture,
            quant_state_device=self.spec.device if quantized else None,
            notes={
                "tensor_types": json.dumps(type_counts(types)),
                "gguf_file": str(self.gguf.path),
                "threads": str(self.threads),
                "kv_positions_per_sequence": str(self.n_positions),
            },
        )

    def reset_device_peaks(self) -> None:
        """No-op: llama.cpp keeps no allocator peaks."""

    def device_memory(self) -> dict[str, int | None]:
        """CUDA: what NVML attributes to this process (llama.cpp has no allocator counters)."""
        if not self.on_gpu:
            return {}
        from harness.measure.trackers import nvml_process_bytes

        return {"device_process_bytes": nvml_process_bytes(int(self.spec.device.partition(":")[2] or 0))}

    # --- running --------------------------------------------------------------------------

    def _clear(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def _eval(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        sequences: np.ndarray,
        outputs: np.ndarray,
        into: np.ndarray | None = None,
    ) -> None:
        """llama_decode token i at positions[i] of sequence sequences[i], in calls of BATCH_TOKENS.
        The tokens where outputs[i] get logits; with `into` ([outputs.sum(), vocab] float32) they are
        copied there in order (llama_get_logits keeps the batch's order)."""
        import llama_cpp

        batch, vocab, copied = self._handles.batch, self.n_vocab, 0
        for offset in range(0, len(tokens), BATCH_TOKENS):
            end = min(offset + BATCH_TOKENS, len(tokens))
            batch.n_tokens = end - offset
            for i, j in enumerate(range(offset, end)):
                batch.token[i] = int(tokens[j])
                batch.pos[i] = int(positions[j])
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = int(sequences[j])
                batch.logits[i] = bool(outputs[j])
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} at token {offset} of {len(tokens)}")
            wanted = int(np.count_nonzero(outputs[offset:end]))
            if into is not None and wanted:
                rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(wanted * vocab,))
                into[copied : copied + wanted] = rows.reshape(wanted, vocab)
                copied += wanted

    def _prompts(self, input_ids: np.ndarray, into: np.ndarray | None = None) -> None:
        """A fresh cache, then every row of `input_ids` as its own sequence (row r = sequence r),
        computing each row's last position's logits (copied into `into` [batch, vocab] when given)."""
        batch, tokens = input_ids.shape
        positions = np.tile(np.arange(tokens), batch)
        self._clear()
        self._eval(input_ids.reshape(-1), positions, np.repeat(np.arange(batch), tokens), positions == tokens - 1, into)

    def _fit(self, batch: int, tokens: int) -> None:
        """Check that `batch` sequences of `tokens` fit; make a context for a larger batch than the current."""
        import llama_cpp

        if tokens > self.n_positions:
            raise ValueError(f"{tokens} tokens exceed the {self.n_positions} positions per sequence allocated at load")
        most = int(llama_cpp.llama_max_parallel_sequences())
        if batch > most:
            raise ValueError(
                f"batch {batch} exceeds llama.cpp's {most} sequences per context: use smaller --batch-sizes"
            )
        if batch > self.sequences:
            self._new_context(batch)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [batch, tokens, vocab]: each row one fresh sequence, every position's logits."""
        batch, tokens = input_ids.shape
        self._fit(1, tokens)
        out = np.empty((batch, tokens, self.n_vocab), dtype=np.float32)
        positions, every = np.arange(tokens), np.ones(tokens, dtype=bool)
        for row in range(batch):
            self._clear()
            self._eval(np.asarray(input_ids[row]), positions, np.zeros(tokens, dtype=np.int32), every, out[row])
        return out

    def prefill(self, input_ids: np.ndarray) -> None:
        """One pass over every prompt row (each its own sequence, decoded together) that fills the KV
        cache and computes each row's last position's logits, left in llama.cpp's buffer."""
        self._fit(*input_ids.shape)
        self._prompts(np.asarray(input_ids))

    def max_positions(self) -> int | None:
        return self.n_positions or None

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the llama.cpp backend runs causal LMs only")

    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        """Greedy (argmax) generation of exactly `new_tokens` per row, EOS included, every row at once:
        the prompts' pass gives each row's first token, then one llama_decode per step gives every
        row's next. `on_token` is called once per step, after the step's tokens exist. Returns
        [batch, new_tokens]; llama.cpp's own prompt and token-eval timings land in `last_timings`
        (llama.cpp counts a step of more than one row as prompt evaluation)."""
        import llama_cpp

        ids = np.asarray(input_ids)
        batch, prompt = ids.shape
        self._fit(batch, prompt + new_tokens)
        llama_cpp.llama_perf_context_reset(self.ctx)
        logits = np.empty((batch, self.n_vocab), dtype=np.float32)
        self._prompts(ids, into=logits)
        out = np.empty((batch, new_tokens), dtype=np.int64)
        rows, every = np.arange(batch), np.ones(batch, dtype=bool)
        for step in range(new_tokens):
            out[:, step] = logits.argmax(axis=1)
            if on_token is not None:
                on_token()
            if step + 1 < new_tokens:
                self._eval(out[:, step], np.full(batch, prompt + step), rows, every, logits)
        perf = llama_cpp.llama_perf_context(self.ctx)
        self.last_timings = {
            "batch": batch,
            "prompt_ms": perf.t_p_eval_ms,
            "prompt_tokens": perf.n_p_eval,
            "eval_ms": perf.t_eval_ms,
            "eval_tokens": perf.n_eval,
        }
        return out

    def llamacpp_decode_tok_s(self) -> float | None:
        """llama.cpp's own decode rate of the last generate (single-token evals / their time); None
        after a batch, whose steps llama.cpp counts as prompt evaluation."""
        timings = self.last_timings
        if not timings or timings["batch"] != 1 or not timings["eval_ms"]:
            return None
        return timings["eval_tokens"] / (timings["eval_ms"] / 1000)

    def roundtrip_max_abs_diff(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> float:
        raise NotImplementedError("GGUF files are the serialized form")

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        """Copy bandwidth of the memory the weights live in: host memory on CPU, device memory on CUDA."""
        from harness.measure.trackers import copy_bandwidth_bytes_s

        if self.on_gpu:
            import torch

            src = torch.ones(size_bytes // 4, dtype=torch.float32, device="cuda")
            dst = torch.empty_like(src)
            return copy_bandwidth_bytes_s(lambda: dst.copy_(src), torch.cuda.synchronize, size_bytes)
        host_src = np.ones(size_bytes // 4, dtype=np.float32)
        host_dst = np.empty_like(host_src)
        return copy_bandwidth_bytes_s(lambda: np.copyto(host_dst, host_src), self.synchronize, size_bytes)
