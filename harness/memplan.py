"""A memory plan from config.json alone: weights, KV cache, activations and load transient.

No weight file is opened. The architecture is built on the meta device at the precision's storage
dtype (the registry's `Precision.torch_dtypes`), and bitsandbytes' module replacement is applied by
arithmetic, with transformers' own rule for which layers to keep (`get_keys_to_not_convert`,
`modules_to_not_convert`, `should_convert_module`), without importing bitsandbytes (its import
probes CUDA, and the plan runs in the parent process). The byte rules below mirror the tensors
that `PyTorchBackend.weight_stats` counts after a real load and first forward (bitsandbytes
0.50.2, transformers 5.24); tests/test_memplan.py checks them against real loads of the zoo and
of the architectures in `harness.archs`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.models import model_kind_from_config
from harness.registry import PRECISIONS, Precision
from harness.units import GIB

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int64": 8}

# --- bitsandbytes storage rules (bitsandbytes 0.50.2, checked against real loads) ------------
BNB_4BIT_BLOCK = 64  # elements per absmax
BNB_NESTED_BLOCK = 256  # absmax values per nested (double-quantization) absmax
BNB_4BIT_CODE_BYTES = 16 * 4  # each 4-bit layer holds its own 16-entry fp32 code table
BNB_NESTED_OFFSET_BYTES = 4  # nf4-dq: one fp32 offset per layer
BNB_NESTED_CODE_BYTES = 256 * 4  # nf4-dq: each layer holds its own copy of the 256-entry dynamic map
BNB_INT8_SCALE_BYTES = 4  # LLM.int8(): one fp32 scale (SCB) per output row
# Other weight-only quantizers (torchao, quanto, HQQ, GGUF), an estimate: bits / 8 per element plus
# one scale and one zero point per group (`Precision.options["group_size"]`, else one per output row),
# each SCALE_BYTES wide.
SCALE_BYTES = 2

# --- activations the measurement makes --------------------------------------------------------
# The quality pass compares reference and candidate logits chunk by chunk (harness/quality.py):
# per logit, the candidate's fp32 logits (4) + fp64 log-softmax of reference (8) and candidate (8)
# + one fp64 temporary of their difference/product (8).
QUALITY_BYTES_PER_LOGIT = 4 + 8 + 8 + 8
PREFILL_LOGIT_BYTES = 4  # fp32 logits of the last prompt position (prefill keeps 1 position)

# --- load transient: extra host memory that from_pretrained holds during the load --------------
# Rule: for a quantized precision, the largest tensor at the checkpoint's dtype (config.json's
# torch_dtype/dtype, float32 when absent); nothing for float precisions.
# Measured (CPU, transformers 5.24, bitsandbytes 0.50.2; peak RssAnon during from_pretrained
# minus RssAnon before minus weight bytes; fresh process per load) on a 75.5M-param Llama (bf16
# checkpoint 151 MB, largest tensor 25 MB; 3-4 runs each) and a Qwen2.5-0.5B-shaped model (bf16
# checkpoint 988 MB, largest tensor 272 MB; 1 run each):
#   fp32/fp16 from bf16: 2.4 / 4.8 MB: converted tensor by tensor into the final parameters. The
#     mapped checkpoint adds ~1.0x its size of file-backed (reclaimable) RSS until the load ends.
#   bf16 from bf16: none; the weights stay file-backed until the first forward touches them.
#   int8: 17-20 / 42 MB; nf4, nf4-dq, fp4: <= 8 / <= 63 MB, with MALLOC_MMAP_THRESHOLD_=1048576.
#   With glibc's default (dynamic) mmap threshold, freed quantization temporaries stay in the
#   heap in some runs: anon excess up to 0.9x (int8), 1.2x (nf4), 2.2x (fp4) the checkpoint
#   size on the 75M model, up to 1.24x (fp4) on the 0.5B one, bimodal between runs: allocator
#   retention, not memory the load needs: every worker fixes the threshold (harness.worker).
# Float precisions convert tensor by tensor (factor 0); every quantizer holds about one largest
# tensor at the checkpoint dtype while it quantizes it (factor 1; measured for bitsandbytes).


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one model at one precision, from its config alone."""

    precision: str
    weight_bytes: int  # params + buffers + quant state at storage dtype, tied weights once
    quantized_param_frac: float
    kv_cache_bytes: int  # batch x (prompt + new tokens), activation dtype, GQA/MQA aware
    activation_bytes: int  # largest activation the measurement makes (quality logits chunk etc.)
    load_transient_bytes: int  # extra host memory from_pretrained needs during the load (measured rule)
    peak_bytes: int  # weights + kv + activations + transient
    notes: str  # e.g. "lm_head and embeddings kept in float16"
    param_count: int = 0  # parameters, tied once (a 4-bit layer counts its unpacked elements)

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


def _is_bnb(precision: Precision, bits: int) -> bool:
    return precision.family == "bitsandbytes" and precision.bits == bits


def _generic_quantized_bytes(precision: Precision, numel: int, out_features: int) -> int:
    group = precision.options.get("group_size") or max(numel // max(out_features, 1), 1)
    return math.ceil(numel * precision.bits / 8) + math.ceil(numel / group) * 2 * SCALE_BYTES


def _saved_precision(spec: Precision, config: dict) -> Precision:
    """`as-saved` planned with the bits and group size its quantization_config states (4-bit if none)."""
    from dataclasses import replace

    saved = config.get("quantization_config") or {}
    bits = saved.get("bits") or saved.get("nbits") or (8 if saved.get("load_in_8bit") else 4)
    group = saved.get("group_size") or saved.get("q_group_size") or (64 if saved.get("load_in_4bit") else None)
    return replace(spec, bits=float(bits), options={"group_size": group})


def _count_weights(model: Any, spec: Precision, storage: str, compute: str, cpu_packed: bool) -> _Weights:
    """Bytes of every parameter, buffer and quant state after load and first forward."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    precision = spec.name
    quantized = spec.quantized
    int8 = _is_bnb(spec, 8)
    keep = _keys_to_not_convert(model) if quantized else []
    fp32_modules = _fp32_patterns(model, storage)
    owners: dict[int, tuple[str, Any, str]] = {}
    kept = set()
    for module_name, module in model.named_modules():
        is_linear = type(module) is nn.Linear or isinstance(module, Conv1D)
        if quantized and is_linear and not should_convert_module(module_name, keep):
            kept.add(module_name)
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (module_name, module, attr))

    total = params = quantized_params = layers = 0
    for name, param in model.named_parameters():  # tied parameters once
        module_name, module, attr = owners[id(param)]
        numel = param.numel()
        params += numel
        dtype = str(param.dtype).removeprefix("torch.")
        if _in_module_list(name, fp32_modules):
            dtype = "float32"
        is_linear = type(module) is nn.Linear or isinstance(module, Conv1D)
        if not (quantized and is_linear and should_convert_module(module_name, keep)):
            total += numel * DTYPE_BYTES[dtype]
            continue
        if attr == "bias":
            # int8 keeps biases at the fp16 storage dtype; Linear4bit's forward casts its bias to
            # the compute dtype (bias.data = bias.data.to(x.dtype)) at the first forward.
            bnb4 = spec.family == "bitsandbytes" and not int8
            total += numel * DTYPE_BYTES[compute if bnb4 else storage]
            continue
        layers += 1
        quantized_params += numel
        out_features = param.shape[1] if isinstance(module, Conv1D) else param.shape[0]
        if spec.family != "bitsandbytes":
            total += _generic_quantized_bytes(spec, numel, int(out_features))
            continue
        if int8:
            total += numel + out_features * BNB_INT8_SCALE_BYTES
            continue
        blocks = math.ceil(numel / BNB_4BIT_BLOCK)
        total += math.ceil(numel / 2) + BNB_4BIT_CODE_BYTES
        if cpu_packed:
            # AVX512-BF16 CPUs repack at the first forward: absmax dequantized to one bf16 per block,
            # the nested state dropped, the offset kept (bitsandbytes _convert_weight_packed_for_cpu).
            total += blocks * 2 + (BNB_NESTED_OFFSET_BYTES if precision == "nf4-dq" else 0)
        elif precision == "nf4-dq":
            nested_absmax = math.ceil(blocks / BNB_NESTED_BLOCK) * 4
            total += blocks + nested_absmax + BNB_NESTED_CODE_BYTES + BNB_NESTED_OFFSET_BYTES
        else:
            total += blocks * 4
    for buffer in model.buffers():
        total += buffer.numel() * DTYPE_BYTES.get(str(buffer.dtype).removeprefix("torch."), 4)
    return _Weights(total, params, quantized_params, layers, tuple(sorted(kept)))


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


def activation_bytes(hf_config: Any, config: dict, batch_size: int, logits_tokens: int) -> int:
    """The largest activation the measurement makes: the quality pass's logits chunk, or the
    prefill's last-position logits (causal LMs); encoders: the hidden states of a batch."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if model_kind_from_config(config) != "causal-lm" and not _is_encoder_decoder(config):
        return batch_size * max(logits_tokens, 1) * int(text_config.hidden_size) * 4
    vocab = int(text_config.vocab_size)
    return max(logits_tokens * vocab * QUALITY_BYTES_PER_LOGIT, batch_size * vocab * PREFILL_LOGIT_BYTES)


def checkpoint_dtype(config: dict) -> str:
    """The dtype the checkpoint's weights are saved in, as config.json states it (float32 if not)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.") if str(name).removeprefix("torch.") in DTYPE_BYTES else "float32"


def load_transient_bytes(precision: str, largest_numel: int, saved_dtype: str, storage_dtype: str) -> int:
    """Extra host memory from_pretrained holds during the load, by the measured rule above."""
    factor = 1.0 if PRECISIONS[precision].quantized else 0.0
    return int(factor * largest_numel * DTYPE_BYTES[saved_dtype])


def _largest_numel(model: Any) -> int:
    return max((p.numel() for p in model.parameters()), default=0)


def _notes(spec: Precision, storage: str, compute: str, counted: _Weights, cpu_packed: bool, config: dict) -> str:
    notes = []
    if counted.quantized_layers:
        scheme = spec.description
        kept = "".join(f", {name}" for name in counted.kept)
        notes.append(f"{counted.quantized_layers} Linear layers in {scheme}; embeddings, norms{kept} kept in {storage}")
        if cpu_packed:
            notes.append("CPU-packed 4-bit layout (bf16 absmax)")
        if spec.family != "bitsandbytes":
            notes.append(f"estimate: {spec.bits:g} bits per weight + a scale and zero point per group")
    elif spec.quantized:
        notes.append(f"no Linear layer to quantize: all weights in {storage}")
    if storage != compute:
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
    cpu_packed_4bit: bool | None = None,
) -> list[MemoryPlan]:
    """`plan_memory` for several precisions of one model: one meta model per storage dtype.

    Keras precisions follow KerasHub's rules; every other precision is planned on the PyTorch meta
    model (a float precision is the same bytes in any framework)."""
    hf_config = _transformers_config(config)
    activations = activation_bytes(hf_config, config, batch_size, logits_tokens)
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
        cpu_packed = device == "cpu" and fast_bf16 and _is_bnb(spec, 4) and cpu_packed_4bit is not False
        counted = _count_weights(model, spec, storage, compute, cpu_packed)
        # Hidden states (and so the cache) stay in the storage dtype of the embeddings: 4-bit
        # layers that compute in fp32 return their input's dtype.
        kv = kv_cache_bytes(hf_config, config, prompt_tokens, new_tokens, batch_size, storage)
        transient = load_transient_bytes(precision, _largest_numel(model), checkpoint_dtype(config), storage)
        plans.append(
            MemoryPlan(
                precision=precision,
                weight_bytes=counted.weight_bytes,
                quantized_param_frac=counted.quantized_params / counted.param_count if counted.param_count else 0.0,
                kv_cache_bytes=kv,
                activation_bytes=activations,
                load_transient_bytes=transient,
                peak_bytes=counted.weight_bytes + kv + activations + transient,
                notes=_notes(spec, storage, compute, counted, cpu_packed, config),
                param_count=counted.param_count,
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
