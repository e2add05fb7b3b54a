"""A memory plan from config.json alone: weights, KV cache, activations and load transient.

No weight file is opened. The architecture is built on the meta device at the precision's storage
dtype (the registry's `Precision.torch_dtypes`), and bitsandbytes' module replacement is applied by
arithmetic, with transformers' own rule for which layers to keep (`get_keys_to_not_convert`,
`modules_to_not_convert`, `should_convert_module`), without importing bitsandbytes (its import
probes CUDA, and the plan runs in the parent process). The byte rules below mirror the tensors
that `PyTorchBackend.weight_stats` counts after a real load and first forward (bitsandbytes
0.50.2, transformers 5.24); tests/test_memplan.py checks them against real loads of the zoo and
of the architectures in `harness.zoo.archs`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.errors import UsageError
from harness.plan.models import model_kind_from_config
from harness.registry import PRECISIONS, Precision
from harness.units import GIB, MIB
from harness.workload import (
    COMPARE_BLOCK_TOKENS,
    ENCODER_BATCH,
    ENCODER_MAX_TOKENS,
    ENCODER_SENTENCES,
    FIRST_FORWARD_TOKENS,
)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int64": 8}
# Each quantizer family's storage rule is its module's `planned_bytes` (harness/backends/quantizers/<family>.py),
# fitted to what the family really stores and checked out of sample against real loads
# (tests/test_memplan.py, tests/test_quantizers.py).

# --- activations the measurement makes (harness/measure/quality.py, harness/measure/throughput.py) -----------------
# The quality pass holds one chunk's logits (CHUNK_TOKENS x vocab, fp32) and the reference's rows of
# the same chunk (fp32, read from the .npy), and compares them in float64 blocks of
# COMPARE_BLOCK_TOKENS rows: at most about five [block, vocab] float64 arrays at once (both
# log-softmaxes, exp, difference, product). A device holds the chunk's logits at the compute dtype
# plus their fp32 copy.
QUALITY_FLOAT64_BLOCKS = 5
STEP_LOGIT_BYTES = 4  # fp32 logits of the last position, per sequence (prefill keeps 1 position; decode steps)

# --- host memory of a CPU worker, phase by phase ---------------------------------------------
# A worker's peak_memory_bytes on cpu is the highest VmHWM of its phases (harness.measure.inference), and
# rss_before_load_bytes its VmRSS after imports. The plan predicts the growth between them
# (`host_peak_bytes`), phase by phase, the largest phase winning:
#   load: the weights (not the tensors it keeps at the checkpoint's dtype: those stay mapped and
#     untouched until the first forward), the checkpoint's pages of every tensor it converts or
#     quantizes (mapped and read: file-backed and reclaimable, but resident), and the quantizer's
#     temporary (the largest layer it converts, at the checkpoint's dtype);
#   first_forward: the weights; after it, a mapped input embedding that no output head reads whole
#     is resident only where tokens read it (a page per token fed, PAGE_BYTES);
#   decode (causal LMs: + KV cache + step logits) or encode (encoders: + one batch's hidden states);
#   quality: + the quality pass's activations (QUALITY_FLOAT64_BLOCKS above);
# each + RUNTIME_MIB[path][phase]: what the runtime itself adds by the end of that phase, whatever
# the model. Most of it is shared-library pages (libtorch, oneDNN, bitsandbytes) that a forked
# worker faults in again (resident already in the forkserver and the page cache: RSS counts them,
# the machine does not pay for them twice), the rest allocator and interpreter growth.
# Measured with a smaps probe at every phase boundary: `harness run --devices cpu --no-cold` on the
# zoo (PyTorch 2.13 CPU, transformers 5.25, bitsandbytes 0.50.2, AVX512-BF16 CPU, 2 busy cores):
# the growth over the worker's baseline minus the model terms above, MiB, by compute path. Between
# models the float rows agree within 3 MiB; bitsandbytes rows spread 6-12 MiB (heap the quantizer's
# and the int8 matmul's small temporaries leave behind differs from run to run, even for one
# combination). A later run of the zoo and qwen-0.5b-shape (1.9-2.8 GB peaks) check them.
RUNTIME_MIB: dict[str, dict[str, float]] = {  # medians over the zoo's models (3 causal, 2 encoders)
    "causal:float32": {"load": 19.5, "first_forward": 26.6, "decode": 30.5, "quality": 34.4},
    "causal:float16": {"load": 15.8, "first_forward": 25.9, "decode": 28.9, "quality": 29.9},
    "causal:bfloat16": {"load": 15.9, "first_forward": 31.4, "decode": 39.8, "quality": 48.9},
    "causal:bnb-int8": {"load": 21.0, "first_forward": 34.2, "decode": 39.2, "quality": 45.0},
    "causal:bnb-4bit": {"load": 28.9, "first_forward": 40.3, "decode": 42.8, "quality": 44.8},
    "encoder:float32": {"load": 18.5, "first_forward": 29.5, "encode": 31.9, "quality": 51.1},
    "encoder:float16": {"load": 15.6, "first_forward": 24.8, "encode": 25.6, "quality": 32.3},
    "encoder:bfloat16": {"load": 15.8, "first_forward": 31.5, "encode": 33.2, "quality": 50.6},
    "encoder:bnb-int8": {"load": 16.4, "first_forward": 27.9, "encode": 37.5, "quality": 57.0},
    "encoder:bnb-4bit": {"load": 34.2, "first_forward": 41.1, "encode": 41.1, "quality": 47.4},
}
# How far the runtime's own part may differ on another machine (other CPU, kernel, THP setting):
# the same tiny fp32 LoRA step grew 57 MiB here and 103 MiB on the CI machine, and a tiny bf16 one
# 69 MiB more on CI than planned from this machine's constants. A plan is checked within a fraction of
# the measured peak or within this, whichever is larger (on models of 100s of MiB the fraction rules).
RUNTIME_SPREAD_BYTES = 128 << 20
PAGE_BYTES = 4096  # a mapped embedding row a token reads makes (at least) its page resident
RUNTIME_FALLBACK = "float32"  # families without a measured path use their compute dtype's, else this
GPU_HOST_REASON = (
    "the host side of a GPU worker is not planned (CUDA libraries' pages, pinned staging buffers); "
    "predicted_device_peak_bytes plans the allocator"
)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one model at one precision, from its config alone."""

    precision: str
    weight_bytes: int  # params + buffers + quant state at storage dtype, tied weights once
    quantized_param_frac: float
    kv_cache_bytes: int  # batch x (prompt + new tokens), activation dtype, GQA/MQA aware
    activation_bytes: int  # largest activation the measurement makes (quality chunk, or step logits without quality)
    load_transient_bytes: int  # extra memory a quantizer holds during the load (one largest tensor)
    peak_bytes: int  # weights + kv + activations + transient: the need the pre-flight checks (no phase overlap assumed)
    notes: str  # e.g. "lm_head and embeddings kept in float16"
    param_count: int = 0  # parameters, tied once (a 4-bit layer counts its unpacked elements)
    # Phase by phase (see "host memory of a CPU worker" above); None where the plan does not model it.
    host_peak_bytes: int | None = None  # cpu: host RSS growth over the worker's baseline at its peak phase
    host_peak_phase: str | None = None
    checkpoint_pages_bytes: int = 0  # checkpoint pages a converting load keeps mapped (host, reclaimable)
    runtime_bytes: int = 0  # the runtime's own growth at the host peak phase (RUNTIME_MIB)
    host_phase_bytes: dict[str, int] | None = None  # cpu: the host RSS growth planned for each phase
    device_peak_bytes: int | None = None  # cuda/xla: the allocator's peak (weights + the largest phase's own bytes)
    device_peak_phase: str | None = None

    def breakdown(self) -> str:
        """`needs ≈ 17.4 GiB (weights 16.1 + KV 0.3 + logits 1.0 + load 0.0)`-style text, in GiB."""
        parts = (
            ("weights", self.weight_bytes),
            ("KV", self.kv_cache_bytes),
            ("activations", self.activation_bytes),
            ("load", self.load_transient_bytes),
        )
        inner = " + ".join(f"{name} {value / GIB:.1f}" for name, value in parts)
        return f"≈ {self.peak_bytes / GIB:.1f} GiB ({inner})"


# --- reading config.json ----------------------------------------------------------------------


def read_config(source: str) -> dict:
    """config.json of a zoo name, a local directory (or the file itself), or a hub id.

    A hub id downloads config.json only, through huggingface_hub's cache (honours HF_HUB_OFFLINE
    and HF_HOME). Problems are one-line UsageErrors.
    """
    from harness.zoo import ZOO, ensure_built

    if source in ZOO:
        return _read_json(ensure_built(source) / "config.json", source)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_json(path, source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"'{source}' has no config.json: point at a Hugging Face checkpoint directory")
        return _read_json(path / "config.json", source)
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise UsageError(f"'{source}' is neither a directory with config.json nor a hub id org/name")
    return _read_json(Path(_hub_config_file(source)), source)


def _read_json(path: Path, source: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"cannot read config.json of '{source}' ({type(exc).__name__}): re-save the checkpoint"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UsageError(f"config.json of '{source}' has no model_type: is it a transformers checkpoint?")
    return config


def _hub_config_file(repo_id: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
    except ImportError:
        raise UsageError(
            f"'{repo_id}' looks like a hub id, which needs huggingface_hub: pip install huggingface_hub"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return hf_hub_download(repo_id, "config.json", local_files_only=offline)
    except (OfflineModeIsEnabled, EntryNotFoundError) as exc:
        if offline or isinstance(exc, OfflineModeIsEnabled):
            raise UsageError(
                f"config.json of '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
                f"fill the cache where there is network (hf download {repo_id} config.json) or unset HF_HUB_OFFLINE"
            ) from None
        raise UsageError(f"hub repository '{repo_id}' has no config.json") from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"hub repository '{repo_id}' does not exist or is private (log in with hf auth login)"
        ) from None
    except OSError as exc:  # network errors are OSErrors (requests/httpx ConnectionError)
        raise UsageError(
            f"cannot fetch config.json of '{repo_id}' ({type(exc).__name__}): check the network, "
            "or set HF_HUB_OFFLINE=1 to use the local cache"
        ) from None


# --- the meta model ---------------------------------------------------------------------------


def _transformers_config(config: dict) -> Any:
    from transformers import AutoConfig

    values = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "quantization_config")}
    try:
        return AutoConfig.for_model(config["model_type"], **values)
    except (KeyError, ValueError) as exc:
        raise UsageError(
            f"model_type '{config.get('model_type')}' is unknown to this transformers ({type(exc).__name__}): "
            "upgrade transformers, or the model needs its own code"
        ) from None


def _is_encoder_decoder(config: dict) -> bool:
    return bool(config.get("is_encoder_decoder"))


def _meta_model(hf_config: Any, config: dict, storage_dtype: str) -> Any:
    """The architecture as the harness loads it, on the meta device, at `storage_dtype`."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if _is_encoder_decoder(config):
        model_class = AutoModelForSeq2SeqLM
    elif model_kind_from_config(config) == "causal-lm":
        model_class = AutoModelForCausalLM
    else:
        model_class = AutoModel
    with torch.device("meta"):
        return model_class.from_config(hf_config, dtype=getattr(torch, storage_dtype))


def _keys_to_not_convert(model: Any) -> list[str]:
    """transformers' own rule for the Linear layers bitsandbytes keeps (lm_head, tied, last)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keys = list(get_keys_to_not_convert(model))
    return sorted({*keys, *(getattr(model, "_keep_in_fp32_modules", None) or ())})


def _fp32_patterns(model: Any, storage_dtype: str) -> list[str]:
    """Module names from_pretrained keeps in fp32 at this dtype (`_keep_in_fp32_modules[_strict]`)."""
    import torch

    plan = getattr(model, "_get_dtype_plan", None)
    return list(plan(getattr(torch, storage_dtype))) if plan else []


def _in_module_list(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    return any(p in parts or name.startswith(f"{p}.") or name == p for p in patterns)


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weights:
    weight_bytes: int
    param_count: int
    quantized_params: int
    quantized_layers: int
    kept: tuple[str, ...]
    largest_converted: int = 0  # elements of the largest layer the family converts
    unconverted_param_bytes: int = 0  # parameters the family leaves as they are, at their dtype
    estimated: bool = False  # no family rule: the generic estimate


def _family(spec: Precision) -> ModuleType | None:
    """The precision's family module (the registry's `quantizer`, else harness/backends/quantizers/<family>.py),
    for its `planned_bytes` rule; importing it never imports the quantizer library itself."""
    name = spec.quantizer or f"harness.backends.quantizers.{spec.family}"
    if importlib.util.find_spec(name) is None:
        return None
    module = importlib.import_module(name)
    return module if hasattr(module, "planned_bytes") else None  # e.g. a plugin's module without a rule


# A quantizer without a planning rule (a pre-quantized GPTQ or AWQ checkpoint, a plugin's module
# without `planned_bytes`): its stated bits per weight plus a scale and a zero point per group (per
# output row without a group), 2 bytes each; the plan's notes say it is an estimate.
GENERIC_SCALE_BYTES = 2


def _saved_precision(spec: Precision, config: dict) -> Precision:
    """`as-saved` planned as the family its quantization_config names (bitsandbytes), else with the
    bits and group size it states (4-bit if none), by the generic estimate above."""
    from dataclasses import replace

    saved = config.get("quantization_config") or {}
    if saved.get("quant_method") == "bitsandbytes":
        eight = bool(saved.get("load_in_8bit"))
        options = {"load_in_8bit": True} if eight else {
            "quant_type": saved.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(saved.get("bnb_4bit_use_double_quant")),
        }  # fmt: skip
        bnb = PRECISIONS["int8" if eight else "nf4"]
        return replace(spec, family="bitsandbytes", quantizer=bnb.quantizer, bits=bnb.bits, options=options)
    bits = saved.get("bits") or saved.get("nbits") or (8 if saved.get("load_in_8bit") else 4)
    group = saved.get("group_size") or saved.get("q_group_size")
    return replace(spec, bits=float(bits), quantizer=None, options={"group_size": group})


def _generic_bytes(spec: Precision, linear: Any) -> int:
    group = spec.options.get("group_size") or linear.in_features
    numel = linear.numel
    scales = math.ceil(numel / group) * 2 * GENERIC_SCALE_BYTES
    return math.ceil(numel * spec.bits / 8) + scales + linear.bias * linear.storage_bytes


def _count_weights(model: Any, spec: Precision, storage: str, compute: str, cpu_packed: bool) -> _Weights:
    """Bytes of every parameter, buffer and quant state after load and first forward: the family's
    `planned_bytes` for each Linear it converts, the storage dtype (or fp32 where the model keeps
    modules in fp32) for everything else."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    from harness.backends.quantizers import PlannedLinear

    family = _family(spec) if spec.quantized else None
    keep = _keys_to_not_convert(model) if spec.quantized else []
    fp32_modules = _fp32_patterns(model, storage)
    converted: dict[int, int] = {}  # id(module) -> planned bytes of the converted layer
    kept = set()
    quantized_params = largest = 0
    for module_name, module in model.named_modules():
        conv1d = isinstance(module, Conv1D)
        if not (spec.quantized and (type(module) is nn.Linear or conv1d)):
            continue
        if not should_convert_module(module_name, keep):
            kept.add(module_name)
            continue
        out_features, in_features = (module.weight.shape[1], module.weight.shape[0]) if conv1d else module.weight.shape
        linear = PlannedLinear(
            out_features=int(out_features),
            in_features=int(in_features),
            bias=0 if module.bias is None else module.bias.numel(),
            conv1d=conv1d,
            storage_bytes=DTYPE_BYTES[storage],
            compute_bytes=DTYPE_BYTES[compute],
            cpu_packed=cpu_packed,
        )
        planned = family.planned_bytes(spec, linear) if family is not None else _generic_bytes(spec, linear)
        if planned is not None:
            converted[id(module)] = planned
            quantized_params += linear.numel
            largest = max(largest, linear.numel)
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    total = sum(converted.values())
    params = unconverted = 0
    for name, param in model.named_parameters():  # tied parameters once
        params += param.numel()
        if id(owners[id(param)]) in converted:
            continue  # counted in the layer's planned bytes (weight, quant state and bias)
        dtype = "float32" if _in_module_list(name, fp32_modules) else str(param.dtype).removeprefix("torch.")
        total += param.numel() * DTYPE_BYTES[dtype]
        unconverted += param.numel() * DTYPE_BYTES[dtype]
    for buffer in model.buffers():
        total += buffer.numel() * DTYPE_BYTES.get(str(buffer.dtype).removeprefix("torch."), 4)
    estimated = spec.quantized and family is None
    return _Weights(
        total, params, quantized_params, len(converted), tuple(sorted(kept)), largest, unconverted, estimated
    )


def _count_gguf(model: Any, spec: Precision, hf_config: Any) -> _Weights:
    """Bytes of the tensors in the precision's GGUF file (harness.backends.quantizers.gguf's rule), from the
    checkpoint's parameters (tied once; buffers are not written)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from harness.backends.quantizers import gguf

    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    inputs = model.get_input_embeddings()
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    tensors = []
    for name, param in model.named_parameters():
        module = owners[id(param)]
        if param is getattr(inputs, "weight", None):
            role, row = "token_embd", param.shape[-1]
        elif isinstance(module, nn.Embedding):
            role, row = "position_embd", param.shape[-1]
        elif type(module) is nn.Linear or isinstance(module, Conv1D):
            is_output = module is model.get_output_embeddings() and param.dim() == 2
            role = "output" if is_output else "linear"
            row = param.shape[0] if isinstance(module, Conv1D) else param.shape[-1]
        else:
            role, row = ("norm" if "norm" in type(module).__name__.lower() else "other"), param.shape[-1]
        layer = next((int(part) for part in name.split(".") if part.isdecimal()), None)
        tensors.append(gguf.PlannedTensor(name, int(row), param.numel(), role, layer))
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    rule = {"layers": int(text_config.num_hidden_layers), "n_gqa": heads // kv_heads}
    total = gguf.planned_bytes(spec, tensors, **rule)
    quantized = gguf.quantized_numel(spec, tensors, **rule)
    types = gguf.planned_types(spec, tensors, **rule)
    layers = sum(types[t.name] not in ("F32", "F16") for t in tensors)
    params = sum(t.numel for t in tensors)
    return _Weights(total, params, quantized, layers, ())


def kv_cache_bytes(
    hf_config: Any, config: dict, prompt_tokens: int, new_tokens: int, batch_size: int, dtype: str
) -> int:
    """2 (K and V) x layers x KV heads x head dim x batch x cached tokens x dtype bytes.

    KV heads: num_key_value_heads, else 1 for multi-query configs, else the attention heads.
    Head dim: head_dim when the config has it, else hidden / heads. A sliding-window layer holds
    the whole prompt after prefill, then at most `sliding_window` tokens. Encoders (and
    encoder-decoder models, which the harness does not run) cache nothing here.
    """
    if _is_encoder_decoder(config) or model_kind_from_config(config) != "causal-lm":
        return 0
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    layers = int(text_config.num_hidden_layers)
    heads = int(text_config.num_attention_heads)
    kv_heads = getattr(text_config, "num_key_value_heads", None)
    if not kv_heads:
        kv_heads = 1 if getattr(text_config, "multi_query", False) else heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    layer_types = getattr(text_config, "layer_types", None) or []
    window = getattr(text_config, "sliding_window", None)
    tokens = prompt_tokens + new_tokens
    per_token = 2 * int(kv_heads) * int(head_dim) * batch_size * DTYPE_BYTES[dtype]
    cached = 0
    for layer in range(layers):
        layer_type = layer_types[layer] if layer < len(layer_types) else ("sliding_attention" if window else "full")
        sliding = layer_type == "sliding_attention" and window
        cached += max(prompt_tokens, min(tokens, int(window))) if sliding else tokens
    return cached * per_token


def _text_config(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def _is_causal(config: dict) -> bool:
    return model_kind_from_config(config) == "causal-lm" or _is_encoder_decoder(config)


def quality_bytes(hf_config: Any, config: dict, logits_tokens: int) -> int:
    """Host bytes of the quality pass's activations (0 with `logits_tokens` 0: quality off).

    Causal LMs: a chunk's fp32 logits and the reference's fp32 rows of it, and the float64 blocks
    of the comparison. Encoders: one batch of fp32 hidden states (harness.measure.quality's sentences)."""

    if not logits_tokens:
        return 0
    text_config = _text_config(hf_config)
    if not _is_causal(config):
        return ENCODER_BATCH * ENCODER_MAX_TOKENS * int(text_config.hidden_size) * 4
    per_logit = 2 * logits_tokens * 4 + QUALITY_FLOAT64_BLOCKS * COMPARE_BLOCK_TOKENS * 8
    return int(text_config.vocab_size) * per_logit


def step_bytes(hf_config: Any, config: dict, batch_size: int, prompt_tokens: int) -> int:
    """Causal LMs: the fp32 last-position logits of a prefill or decode step; encoders: one
    batch's fp32 hidden states."""
    text_config = _text_config(hf_config)
    if not _is_causal(config):
        return batch_size * prompt_tokens * int(text_config.hidden_size) * 4
    return batch_size * int(text_config.vocab_size) * STEP_LOGIT_BYTES


def activation_bytes(
    hf_config: Any, config: dict, batch_size: int, logits_tokens: int, prompt_tokens: int = 128
) -> int:
    """The largest activation the measurement makes on the host: the quality pass's (with quality
    on), else a prefill or decode step's."""
    return max(
        quality_bytes(hf_config, config, logits_tokens), step_bytes(hf_config, config, batch_size, prompt_tokens)
    )


def checkpoint_dtype(config: dict) -> str:
    """The dtype the checkpoint's weights are saved in, as config.json states it (float32 if not)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.") if str(name).removeprefix("torch.") in DTYPE_BYTES else "float32"


def load_transient_bytes(precision: str, largest_numel: int, saved_dtype: str, storage_dtype: str) -> int:
    """Extra anonymous memory a load holds beyond the weights: a quantizer holds about one tensor
    it quantizes at the checkpoint's dtype (`largest_numel`: the largest layer it converts;
    measured for bitsandbytes); a float load converts tensor by tensor into the final parameters."""
    factor = 1.0 if PRECISIONS[precision].quantized else 0.0
    return int(factor * largest_numel * DTYPE_BYTES[saved_dtype])


def _largest_numel(model: Any) -> int:
    return max((p.numel() for p in model.parameters()), default=0)


def _checkpoint_bytes(model: Any, saved_dtype: str) -> int:
    """The checkpoint's size from its parameters (tied once) at the dtype it is saved in."""
    return sum(p.numel() for p in model.parameters()) * DTYPE_BYTES[saved_dtype]


def runtime_path(spec: Precision, compute: str) -> str:
    """The RUNTIME_MIB row of a precision: bitsandbytes by width, else its compute dtype."""
    if spec.family == "bitsandbytes":
        return "bnb-int8" if spec.options.get("load_in_8bit") else "bnb-4bit"
    return compute


def runtime_bytes(path: str, phase: str, kind: str) -> int:
    """RUNTIME_MIB[path] at `phase` (encoders' own rows where measured), in bytes."""
    rows = RUNTIME_MIB.get(f"{kind}:{path}") or RUNTIME_MIB.get(path) or RUNTIME_MIB.get(RUNTIME_FALLBACK, {})
    return int(rows.get(phase, 0.0) * MIB)


def _peak(sizes: dict[str, int]) -> tuple[int, str]:
    """The largest phase: (bytes, phase name)."""
    phase = max(sizes, key=lambda name: sizes[name])
    return sizes[phase], phase


def _host_phases(
    weights: int, own: dict[str, int], resident: dict[str, int], path: str, causal: bool
) -> dict[str, int]:
    """Host RSS growth per phase of a CPU worker (see "host memory" above): the weights resident
    then (`resident`), the phase's own bytes (`own`) and the runtime's (RUNTIME_MIB)."""
    kind = "causal" if causal else "encoder"
    return {
        phase: resident.get(phase, weights) + extra + runtime_bytes(path, phase, kind) for phase, extra in own.items()
    }


def _untied_input_embedding_bytes(model: Any) -> int:
    """Bytes of the input embedding table where no output head reads it whole (untied, or an encoder)."""
    inputs = getattr(model.get_input_embeddings(), "weight", None)
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inputs is None or (outputs is not None and getattr(outputs, "weight", None) is inputs):
        return 0
    return inputs.numel() * inputs.element_size()


def _tokens_fed(causal: bool, batch_size: int, prompt_tokens: int, new_tokens: int, eval_tokens: int) -> dict[str, int]:
    """Tokens the worker has fed by the end of each phase (first forward, throughput, quality)."""

    throughput = batch_size * (prompt_tokens + (new_tokens if causal else 0))
    quality = eval_tokens if causal else ENCODER_SENTENCES * ENCODER_MAX_TOKENS
    return {
        "load": 0,
        "first_forward": FIRST_FORWARD_TOKENS,
        "decode": FIRST_FORWARD_TOKENS + throughput,
        "encode": FIRST_FORWARD_TOKENS + throughput,
        "quality": FIRST_FORWARD_TOKENS + throughput + quality,
    }


def _notes(spec: Precision, storage: str, compute: str, counted: _Weights, cpu_packed: bool, config: dict) -> str:
    notes = []
    if spec.family == "gguf":
        notes.append(
            f"{counted.quantized_layers} tensors in {spec.description} (llama.cpp's per-tensor types), "
            "the rest F16, norms and biases F32"
        )
    elif counted.quantized_layers:
        scheme = spec.description
        kept = "".join(f", {name}" for name in counted.kept)
        notes.append(f"{counted.quantized_layers} Linear layers in {scheme}; embeddings, norms{kept} kept in {storage}")
        if cpu_packed:
            notes.append("CPU-packed 4-bit layout (bf16 absmax)")
        if counted.estimated:
            notes.append(f"estimate: {spec.bits:g} bits per weight + a scale and zero point per group")
    elif spec.quantized:
        notes.append(f"no Linear layer to quantize: all weights in {storage}")
    if storage != compute and spec.family != "gguf":
        notes.append(f"computes in {compute}")
    if _is_encoder_decoder(config):
        notes.append("encoder-decoder model: the harness does not run it")
    return "; ".join(notes)


def plan_memory(
    config: dict,
    precision: str,
    *,
    fast_bf16: bool,
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    logits_tokens: int = 256,
    device: str = "cpu",
    throughput: bool = True,
) -> MemoryPlan:
    """Predict the memory of loading and measuring `config` at `precision`, without any weights.

    `fast_bf16`: the device runs bf16 natively (decides storage/compute dtypes, and on CPU the
    AVX512-BF16 4-bit layout). `device`: cpu, cuda[:N] or xla (where the weights live).
    TensorFlow precisions get a labelled estimate (see `notes`).
    """
    return plan_memories(
        config,
        (precision,),
        fast_bf16=fast_bf16,
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        logits_tokens=logits_tokens,
        device=device,
        throughput=throughput,
    )[0]


def plan_memories(
    config: dict,
    precisions: tuple[str, ...] | list[str],
    *,
    fast_bf16: bool,
    batch_size: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    logits_tokens: int = 256,
    device: str = "cpu",
    throughput: bool = True,
    eval_tokens: int = 2048,
    cpu_packed_4bit: bool | None = None,
) -> list[MemoryPlan]:
    """`plan_memory` for several precisions of one model: one meta model per storage dtype.

    `logits_tokens`: the quality pass's chunk (0: quality off, `--no-quality`); `throughput`:
    prefill/decode run (`--no-throughput` skips them); `eval_tokens`: the quality pass's tokens. Keras precisions follow KerasHub's rules;
    every other precision is planned on the PyTorch meta model (a float precision is the same
    bytes in any framework)."""
    hf_config = _transformers_config(config)
    causal = _is_causal(config)
    quality = quality_bytes(hf_config, config, logits_tokens)
    step = step_bytes(hf_config, config, batch_size, prompt_tokens)
    activations = max(quality, step)
    saved = checkpoint_dtype(config)
    kind = device.partition(":")[0]
    models: dict[str, Any] = {}
    plans = []
    for precision in precisions:
        spec = PRECISIONS[precision]
        if spec.family == "pre-quantized":
            spec = _saved_precision(spec, config)
        if spec.family == "keras":
            plans.append(
                _plan_keras(config, precision, fast_bf16, batch_size, prompt_tokens, new_tokens, logits_tokens)
            )
            continue
        storage, compute = spec.torch_dtypes(fast_bf16)
        if storage not in models:
            models[storage] = _meta_model(hf_config, config, storage)
        model = models[storage]
        bnb_4bit = spec.family == "bitsandbytes" and not spec.options.get("load_in_8bit")
        cpu_packed = kind == "cpu" and fast_bf16 and bnb_4bit and cpu_packed_4bit is not False
        if spec.family == "gguf":
            counted = _count_gguf(model, spec, hf_config)
        else:
            counted = _count_weights(model, spec, storage, compute, cpu_packed)
        weights = counted.weight_bytes
        # Hidden states (and so the cache) stay in the storage dtype of the embeddings: 4-bit
        # layers that compute in fp32 return their input's dtype.
        kv = kv_cache_bytes(hf_config, config, prompt_tokens, new_tokens, batch_size, storage)
        transient = load_transient_bytes(precision, counted.largest_converted, saved, storage)
        # Tensors a load keeps at the checkpoint's dtype stay mapped: untouched until the first
        # forward, and no second copy; every other tensor's checkpoint pages are read while it is
        # converted or quantized, beside the result.
        mapped = counted.unconverted_param_bytes if storage == saved else 0
        pages = _checkpoint_bytes(model, saved) - mapped
        if PRECISIONS[precision].family == "pre-quantized":  # loaded as saved: the file is the weights
            transient, pages, mapped = 0, weights, 0
        own = {"load": transient, "first_forward": 0}
        if throughput:
            own["decode" if causal else "encode"] = (kv if causal else 0) + step
        if quality:
            own["quality"] = quality
        host = runtime = device_peak = host_sizes = None
        host_phase = device_phase = None
        if spec.family == "gguf":
            notes_extra = "llama.cpp's KV cache, compute buffers and mapped file are not planned"
        elif kind == "cpu":
            notes_extra = ""
            resident = {"load": weights - mapped}
            if mapped:  # resident as the phases touch them: an untied input embedding only where read
                table = _untied_input_embedding_bytes(model)
                fed = _tokens_fed(causal, batch_size, prompt_tokens, new_tokens, eval_tokens)
                resident |= {p: weights - table + min(table, fed[p] * PAGE_BYTES) for p in own if p != "load"}
            path = runtime_path(spec, compute)
            host_sizes = _host_phases(weights, own | {"load": pages + transient}, resident, path, causal)
            host, host_phase = _peak(host_sizes)
            runtime = runtime_bytes(path, host_phase, "causal" if causal else "encoder")
        else:
            notes_extra = ""
            if quality and causal:  # a device holds the chunk's logits at the compute dtype and their fp32 copy
                text = _text_config(hf_config)
                own["quality"] = logits_tokens * int(text.vocab_size) * (DTYPE_BYTES[compute] + 4)
            device_peak, device_phase = _peak({phase: weights + extra for phase, extra in own.items()})
        plans.append(
            MemoryPlan(
                precision=precision,
                weight_bytes=weights,
                quantized_param_frac=counted.quantized_params / counted.param_count if counted.param_count else 0.0,
                kv_cache_bytes=kv,
                activation_bytes=activations,
                load_transient_bytes=transient,
                peak_bytes=weights + kv + activations + transient,
                notes="; ".join(
                    filter(None, (_notes(spec, storage, compute, counted, cpu_packed, config), notes_extra))
                ),
                param_count=counted.param_count,
                host_peak_bytes=host,
                host_peak_phase=host_phase,
                host_phase_bytes=host_sizes,
                checkpoint_pages_bytes=pages if kind == "cpu" else 0,
                runtime_bytes=runtime or 0,
                device_peak_bytes=device_peak,
                device_peak_phase=device_phase,
            )
        )
    return plans


# --- TensorFlow / Keras ----------------------------------------------------------------------
# Keras 3.15 / KerasHub 0.32 `model.quantize()`, read off the variables of real quantized models:
# Dense/EinsumDense kernels, the token (Reversible)Embedding, token-type embeddings and an untied
# reverse embedding (the lm_head) are quantized; learned position embeddings, norms and biases
# stay float. int8: one int8 per element + one float scale per output unit (per vocabulary row
# for embeddings). int4: two elements per int8 byte, in groups of 128 along the input dimension,
# each with a float scale and an int8 zero point (float for the reverse embedding), + a float32
# g_idx per input row and kernel (not for the reverse embedding; GPT-2's fused c_attn is three
# kernels in Keras). "Float" is the harness's Keras policy:
# bfloat16 where bf16 is native, else float32 (harness/backends/keras_common.py).
KERAS_FLOAT_POLICY_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
KERAS_INT4_GROUP = 128
KERAS_POSITION_EMBEDDINGS = ("position", "wpe", "embed_positions")  # PositionEmbedding: not quantized


def _keras_quantized_bytes(mode: str, numel: int, inputs: int, outputs: int, reverse: bool, float_bytes: int) -> int:
    if mode == "int8":
        return numel + outputs * float_bytes
    groups = math.ceil(inputs / KERAS_INT4_GROUP)
    if reverse:
        return math.ceil(numel / 2) + groups * outputs * 2 * float_bytes
    return math.ceil(numel / 2) + groups * outputs * (float_bytes + 1) + inputs * 4  # g_idx: float32


def _plan_keras(
    config: dict,
    precision: str,
    fast_bf16: bool,
    batch_size: int,
    prompt_tokens: int,
    new_tokens: int,
    logits_tokens: int,
) -> MemoryPlan:
    """Keras weights by the rules above, from the PyTorch meta model's tensors (same shapes)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    mode = PRECISIONS[precision].options.get("mode")
    quantized = mode is not None
    if not quantized and precision not in KERAS_FLOAT_POLICY_BYTES:
        raise ValueError(f"precision {precision} is not a Keras precision")
    float_bytes = (2 if fast_bf16 else 4) if quantized else KERAS_FLOAT_POLICY_BYTES[precision]
    hf_config = _transformers_config(config)
    model = _meta_model(hf_config, config, "float32")
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owners = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (module_name, module, attr))
    total = params = quantized_params = 0
    for _name, param in model.named_parameters():  # tied once
        module_name, module, attr = owners[id(param)]
        numel = param.numel()
        params += numel
        is_kernel = attr == "weight" and isinstance(module, (nn.Linear, Conv1D))
        is_position = any(key in module_name.rsplit(".", 1)[-1] for key in KERAS_POSITION_EMBEDDINGS)
        if quantized and is_kernel:
            inputs, outputs = param.shape if isinstance(module, Conv1D) else (param.shape[1], param.shape[0])
            reverse = module is output_embeddings
            total += _keras_quantized_bytes(mode, numel, int(inputs), int(outputs), reverse, float_bytes)
            if mode == "int4" and module_name.endswith("c_attn"):  # Keras: query, key, value
                total += 2 * int(inputs) * 4
            quantized_params += numel
        elif quantized and isinstance(module, nn.Embedding) and not is_position:
            rows, dim = param.shape
            total += _keras_quantized_bytes(mode, numel, int(dim), int(rows), False, float_bytes)
            quantized_params += numel
        else:
            total += numel * float_bytes
    dtype = {2: "bfloat16" if quantized or precision == "bf16" else "float16", 4: "float32"}[float_bytes]
    kv = kv_cache_bytes(hf_config, config, prompt_tokens, new_tokens, batch_size, dtype)
    activations = activation_bytes(hf_config, config, batch_size, logits_tokens)
    transient = _largest_numel(model) * DTYPE_BYTES[checkpoint_dtype(config)]
    return MemoryPlan(
        precision=precision,
        weight_bytes=total,
        quantized_param_frac=quantized_params / params if params else 0.0,
        kv_cache_bytes=kv,
        activation_bytes=activations,
        load_transient_bytes=transient,
        peak_bytes=total + kv + activations + transient,
        notes="Keras (KerasHub): weights by its quantization rules; KV and load transient estimated",
        param_count=params,
    )
