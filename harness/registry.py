"""The registry: what each framework and each precision is, declared once and read by everyone.

A framework says which packages it needs, how its workers start, what they preload, which
exceptions mean out-of-memory, and its backend class as a lazy `"module:Class"` path, so the
parent process never imports a framework. A precision says its family (the quantizer), the
frameworks and packages it needs, the devices it runs on (and why not elsewhere), how it loads
(its family's worker-side module builds the `quantization_config`), the dtypes of what stays
unquantized, its default agreement tolerance (from a measured loss), whether it serializes, and
its display order (its position below).

Readers: `matrix` (names, defaults, skip rules), `launcher` (start method, preload, import
probe), `backends.backend_for` (backend class), the PyTorch backend (load kwargs, byte
counting), `memplan` (dtypes, bits), `checks` (tolerances), the report (family, order), the CLI
and pytest options (help text), and the README's precision table (`harness precisions --format md`).

Nothing here imports a framework. Extra entries come from modules named in $HARNESS_PLUGINS
(comma list), each exposing `FRAMEWORKS` and/or `PRECISIONS` tuples: one entry adds a precision.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from harness.known_issues import BY_ID as KNOWN_ISSUES

PLUGINS_ENV = "HARNESS_PLUGINS"
DEVICE_KINDS = ("cpu", "cuda", "xla")


@dataclass(frozen=True)
class Framework:
    """How one framework's workers start and which backend runs its models."""

    name: str
    description: str
    packages: tuple[str, ...]  # import names the framework needs
    extra: str  # pip extra that installs them: pip install 'harness[<extra>]'
    backend: str  # "module:Class" implementing harness.backends.base.Backend
    start_method: str  # forkserver (preloaded, cheap fresh children) | spawn (a clean interpreter each)
    import_statement: str  # what the import_s probe times in a fresh interpreter
    devices: tuple[str, ...]  # device kinds it can reach
    preload: tuple[str, ...] = ()  # modules a forkserver imports once (never touching CUDA)
    oom_exceptions: tuple[str, ...] = ()  # exception class names that mean out of memory
    env: Mapping[str, str] = field(default_factory=dict)  # set in the worker before any import
    cuda_build: str | None = None  # Capabilities attribute that must be true for cuda devices
    no_cuda_build_reason: str = ""
    device_packages: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device kind -> packages
    # "module:function"(model_type, kind) -> why this framework cannot load such a model, or None
    model_support: str | None = None
    null_field_reasons: Mapping[str, str] = field(default_factory=dict)  # fields it never reports, and why
    # "module:function"(timeout_s) -> one line: what `harness setup <name>` installs once, beyond pip
    setup: str | None = None
    default: bool = False  # part of the default matrix
    reference: bool = False  # quality references are measured in this framework
    # the finetune scenario: "module:Class" of its trainer (harness.measure.finetune.Trainer), or why it has none
    trainer: str | None = None
    trainer_packages: tuple[str, ...] = ()  # import names the trainer needs beyond `packages`
    trainer_extra: str | None = None  # pip extra that installs them
    no_trainer_reason: str = ""

    def __post_init__(self) -> None:
        if self.start_method not in ("forkserver", "spawn"):
            raise ValueError(f"{self.name}: start_method must be forkserver or spawn")
        if ":" not in self.backend:
            raise ValueError(f"{self.name}: backend must be 'module:Class'")


@dataclass(frozen=True)
class Precision:
    """One precision: what produces it, where it runs, how it loads and how it is judged."""

    name: str
    family: str  # float | bitsandbytes | torchao | quanto | hqq | keras | gguf | pre-quantized
    description: str
    frameworks: tuple[str, ...]  # frameworks that run it
    bits: float  # bits per weight of the layers it quantizes (the float width for float precisions)
    packages: tuple[str, ...] = ()  # import names beyond the framework's
    extra: str | None = None  # pip extra that installs `packages`
    devices: tuple[str, ...] = DEVICE_KINDS  # device kinds it runs on
    device_reasons: Mapping[str, str] = field(default_factory=dict)  # device kind -> why it does not run there
    min_compute_capability: float | None = None  # CUDA devices below it are skipped
    # PyTorch: dtype of the tensors left unquantized, and of the matmuls. "half" is bf16 where the
    # device runs it natively, else fp16; "half-or-float32" is bf16 where native, else fp32.
    storage_dtype: str = "float32"
    compute_dtype: str = "float32"
    quantizer: str | None = None  # worker-side module: quantization_config() and quantized_weight()
    options: Mapping[str, Any] = field(default_factory=dict)  # the family module's settings for this precision
    # Mean quality loss measured on the zoo's trained models (metric -> value); tolerance = loss x margin.
    measured_loss: Mapping[str, float] = field(default_factory=dict)
    serializes: bool = True  # save_pretrained -> from_pretrained reproduces it
    inference_mode: bool = True  # PyTorch runs it under torch.inference_mode (else torch.no_grad)
    default: bool = False  # part of the default matrix
    reference_rank: int | None = None  # order of preference as the quality reference (0 first)
    # The finetune scenario: how a LoRA adapter attaches to this precision. "plain": on the loaded
    # layers as they are (float weights can also be fully fine-tuned); "kbit": QLoRA, through
    # peft's prepare_model_for_kbit_training (freezes the base, casts what is not quantized to
    # fp32); "": no LoRA here, and `no_lora_reason` says why.
    lora: str = "plain"
    no_lora_reason: str = ""

    def __post_init__(self) -> None:
        for kind in (*self.devices, *self.device_reasons):
            if kind not in DEVICE_KINDS:
                raise ValueError(f"{self.name}: unknown device kind {kind!r}")
        for name in ("storage_dtype", "compute_dtype"):
            if getattr(self, name) not in ("float32", "float16", "bfloat16", "half", "half-or-float32"):
                raise ValueError(f"{self.name}: unknown {name} {getattr(self, name)!r}")
        if self.lora not in ("plain", "kbit", ""):
            raise ValueError(f"{self.name}: lora must be plain, kbit or empty")
        if not self.lora and not self.no_lora_reason:
            raise ValueError(f"{self.name}: a precision without LoRA needs no_lora_reason")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "measured_loss", MappingProxyType(dict(self.measured_loss)))
        object.__setattr__(self, "device_reasons", MappingProxyType(dict(self.device_reasons)))

    @property
    def quantized(self) -> bool:
        return self.family != "float"

    def torch_dtypes(self, fast_bf16: bool) -> tuple[str, str]:
        """(storage, compute) dtype names on a device that does (or does not) run bf16 natively."""

        def resolve(name: str) -> str:
            if name == "half":
                return "bfloat16" if fast_bf16 else "float16"
            if name == "half-or-float32":
                return "bfloat16" if fast_bf16 else "float32"
            return name

        return resolve(self.storage_dtype), resolve(self.compute_dtype)


# --- frameworks ---------------------------------------------------------------------------------

_PYTORCH = Framework(
    name="pytorch",
    description="PyTorch through transformers' from_pretrained",
    packages=("torch", "transformers"),
    extra="torch",
    backend="harness.backends.pytorch:PyTorchBackend",
    start_method="forkserver",
    import_statement="import torch, transformers",
    devices=DEVICE_KINDS,
    preload=("harness.quiet", "harness.run.worker", "harness.measure.inference", "harness.backends.pytorch"),
    oom_exceptions=("OutOfMemoryError",),  # torch.cuda.OutOfMemoryError / torch.OutOfMemoryError
    cuda_build="torch_cuda_build",
    no_cuda_build_reason="the installed torch is a CPU build: install a CUDA build of torch",
    device_packages={"xla": ("torch_xla",)},
    default=True,
    reference=True,
    trainer="harness.backends.pytorch_train:PeftTrainer",
    trainer_packages=("peft",),
    trainer_extra="finetune",
)
_TENSORFLOW = Framework(
    name="tensorflow",
    description="KerasHub on TensorFlow (Keras 3), loading the Hugging Face directory itself",
    packages=("tensorflow", "keras", "keras_hub"),
    extra="tf",
    backend="harness.backends.tensorflow:TensorFlowBackend",
    # spawned: TensorFlow and PyTorch never share a process; each worker pays a ~8 s import,
    # which is why TensorFlow is opt-in (`--frameworks pytorch,tensorflow`).
    start_method="spawn",
    import_statement="import tensorflow, keras, keras_hub",
    devices=("cpu", "cuda"),
    oom_exceptions=("ResourceExhaustedError",),
    env={"KERAS_BACKEND": "tensorflow"},
    cuda_build="tensorflow_gpu_build",
    no_cuda_build_reason="tensorflow-cpu has no GPU support: pip install 'tensorflow[and-cuda]'",
    model_support="harness.backends.keras_support:tensorflow_unsupported_reason",
    null_field_reasons={"peak_device_reserved_bytes": "TensorFlow does not report its allocator's reserved pool"},
    trainer="harness.backends.keras_train:TensorFlowLoraTrainer",
)
_JAX = Framework(
    name="jax",
    description="KerasHub on JAX (Keras 3 with KERAS_BACKEND=jax), the same loader as tensorflow",
    packages=("jax", "keras", "keras_hub"),
    extra="jax",
    backend="harness.backends.keras_jax:JaxBackend",
    start_method="spawn",  # never shares a process with PyTorch or TensorFlow
    # the backend module first: it hides TensorFlow from KerasHub, which would otherwise import it
    import_statement="import harness.backends.keras_jax, keras, keras_hub",
    devices=("cpu", "cuda"),
    oom_exceptions=("XlaRuntimeError",),  # RESOURCE_EXHAUSTED; classified by its message
    env={"KERAS_BACKEND": "jax"},
    cuda_build="jax_cuda_build",
    no_cuda_build_reason="this jax has no CUDA plugin: pip install 'jax[cuda12]'",
    model_support="harness.backends.keras_support:tensorflow_unsupported_reason",
    trainer="harness.backends.keras_train:JaxLoraTrainer",
)
_LLAMACPP_NO_ALLOCATOR = (
    "llama.cpp reports no allocator counters: its weights, KV cache and compute buffers are allocated at load "
    "and kept (device_process_bytes: what NVML attributes to the worker)"
)
_LLAMACPP = Framework(
    name="llamacpp",
    description="llama.cpp through llama-cpp-python, on GGUF files converted and quantized from the checkpoint",
    packages=("llama_cpp", "gguf"),
    extra="llamacpp",
    backend="harness.backends.llamacpp:LlamaCppBackend",
    # its preload imports neither torch nor transformers; importing llama_cpp starts no threads
    start_method="forkserver",
    import_statement="import llama_cpp, gguf",
    devices=("cpu", "cuda"),
    preload=("harness.quiet", "harness.run.worker", "harness.measure.inference", "harness.backends.llamacpp"),
    # no exception class: a failed context is ValueError("Failed to create llama_context"), a failed
    # decode a RuntimeError, a CUDA OOM aborts the process (classified by message or signal)
    oom_exceptions=(),
    cuda_build="llamacpp_cuda_build",
    no_cuda_build_reason="this llama-cpp-python build has no GPU offload: rebuild with CMAKE_ARGS=-DGGML_CUDA=on",
    model_support="harness.backends.llamacpp:unsupported_reason",
    null_field_reasons={
        "roundtrip_max_abs_diff": "GGUF files are the serialized form",
        "peak_device_allocated_bytes": _LLAMACPP_NO_ALLOCATOR,
        "peak_device_reserved_bytes": _LLAMACPP_NO_ALLOCATOR,
    },
    setup="harness.backends.gguf:setup",  # llama.cpp's converter (convert_hf_to_gguf.py), from the llama-cpp-python sdist
    no_trainer_reason="llama.cpp runs GGUF inference only: no training step (fine-tune the Hugging Face checkpoint)",
)

# --- precisions -----------------------------------------------------------------------------------
# Measured loss: mean per-token KL(fp32 || precision) on tiny-llama-trained ("kl_mean"), and
# 1 - mean embedding cosine on minilm ("1 - embed_cosine_mean"), CPU (AVX512-BF16, so weight-only
# quantizers keep bf16 activations), bitsandbytes 0.50.2, torchao 0.18, optimum-quanto 0.2.7,
# llama-cpp-python 0.3.36, transformers 5.24, Keras 3.15:
# `harness run --frameworks pytorch,llamacpp --models tiny-llama-trained,minilm --precisions ... --no-throughput`.


def _loss(kl: float, cosine: float | None = None) -> dict[str, float]:
    return {"kl_mean": kl} | ({} if cosine is None else {"1 - embed_cosine_mean": cosine})


_BNB = {
    "family": "bitsandbytes",
    "frameworks": ("pytorch",),
    "packages": ("bitsandbytes",),
    "extra": "quant",
    "device_reasons": {"xla": "bitsandbytes has no XLA backend"},
    "devices": ("cpu", "cuda"),
    "quantizer": "harness.backends.quantizers.bnb",
    "default": True,
    "lora": "kbit",  # QLoRA: peft's prepare_model_for_kbit_training, then LoRA on Linear8bitLt/Linear4bit
}
# Weight-only quantizers keep activations (and what stays unquantized) in bf16 where the device runs it
# natively, else fp32 (fp16 activations are slow on CPUs without native 16-bit math).
_WEIGHT_ONLY = {"frameworks": ("pytorch",), "storage_dtype": "half-or-float32", "compute_dtype": "half-or-float32"}
_TORCHAO = _WEIGHT_ONLY | {
    "family": "torchao",
    "packages": ("torchao",),
    "extra": "torchao",
    "devices": ("cpu", "cuda"),
    "device_reasons": {"xla": "torchao has no XLA kernels"},
    "quantizer": "harness.backends.quantizers.torchao",
}
_QUANTO = _WEIGHT_ONLY | {
    "family": "quanto",
    "packages": ("optimum.quanto",),
    "extra": "quanto",
    "devices": ("cpu", "cuda"),
    "device_reasons": {"xla": "optimum-quanto has no XLA kernels"},
    "quantizer": "harness.backends.quantizers.quanto",
    "serializes": False,  # QuantoHfQuantizer.is_serializable is False
    # quanto's packed int2/int4 weights set version counters: "Cannot set version_counter for inference tensor"
    "inference_mode": False,
    "lora": "",
    "no_lora_reason": "peft has no LoRA layer for optimum-quanto (its maintainers keep quanto in maintenance mode)",
}
_HQQ = _WEIGHT_ONLY | {
    "family": "hqq",
    "packages": ("hqq",),
    "extra": "hqq",
    "quantizer": "harness.backends.quantizers.hqq",
}
_GGUF = {
    "family": "gguf",
    "storage_dtype": "float16",  # the converter's baseline (the memory plan's estimate starts from it)
    "compute_dtype": "float16",
    "frameworks": ("llamacpp",),
    "devices": ("cpu", "cuda"),
    "device_reasons": {"xla": "llama.cpp has no XLA backend"},
    "serializes": False,  # the GGUF file is the serialized form
    "lora": "",
    "no_lora_reason": "no LoRA on GGUF: llama.cpp runs inference only (fine-tune the Hugging Face checkpoint)",
}
_KERAS = {
    "family": "keras",
    "frameworks": ("tensorflow", "jax"),
    "devices": ("cpu", "cuda"),
    "serializes": False,
}

_BUILTIN_PRECISIONS: tuple[Precision, ...] = (
    Precision("fp32", "float", "float32 weights and compute", ("pytorch", "tensorflow", "jax"), 32,
              measured_loss=_loss(0.0, 0.0), default=True, reference_rank=0),
    Precision("fp16", "float", "float16 weights and compute", ("pytorch", "tensorflow", "jax"), 16,
              storage_dtype="float16", compute_dtype="float16", measured_loss=_loss(2.8e-7, 7.0e-7), default=True,
              reference_rank=2),
    Precision("bf16", "float", "bfloat16 weights and compute", ("pytorch", "tensorflow", "jax"), 16,
              storage_dtype="bfloat16", compute_dtype="bfloat16", min_compute_capability=8.0,
              measured_loss=_loss(1.7e-5, 4.4e-5), default=True, reference_rank=1),
    # LLM.int8() multiplies in fp16, so what stays unquantized is fp16 too.
    Precision("int8", description="LLM.int8() (bitsandbytes 8-bit)", bits=8, storage_dtype="float16",
              compute_dtype="float16", min_compute_capability=7.5, options={"load_in_8bit": True},
              measured_loss=_loss(9.1e-6, 7.4e-4), **_BNB),
    Precision("nf4", description="4-bit NF4 (bitsandbytes)", bits=4, storage_dtype="half",
              compute_dtype="half-or-float32", options={"quant_type": "nf4", "double_quant": False},
              measured_loss=_loss(4.7e-4, 2.8e-2), **_BNB),
    Precision("nf4-dq", description="4-bit NF4 with double quantization (bitsandbytes)", bits=4,
              storage_dtype="half", compute_dtype="half-or-float32",
              options={"quant_type": "nf4", "double_quant": True}, measured_loss=_loss(4.8e-4, 2.8e-2), **_BNB),
    Precision("fp4", description="4-bit FP4 (bitsandbytes)", bits=4, storage_dtype="half",
              compute_dtype="half-or-float32", options={"quant_type": "fp4", "double_quant": False},
              measured_loss=_loss(5.4e-4, 5.6e-2), **_BNB),
    # torchao (tensor subclasses in place of each Linear weight), through TorchAoConfig.
    Precision("ao-int8wo", description="torchao int8 weight-only (Int8WeightOnlyConfig)", bits=8,
              options={"config": "Int8WeightOnlyConfig"}, measured_loss=_loss(2.0e-5, 4.5e-4), **_TORCHAO),
    Precision("ao-int8dq", description="torchao int8 dynamic activations + int8 weights", bits=8,
              options={"config": "Int8DynamicActivationInt8WeightConfig"}, measured_loss=_loss(4.7e-5, 2.5e-3), **_TORCHAO),
    Precision("ao-fp8wo", description="torchao float8 (e4m3) weight-only, one scale per row", bits=8,
              options={"config": "Float8WeightOnlyConfig"}, measured_loss=_loss(4.0e-5, 1.9e-3), **_TORCHAO),
    Precision("ao-int4wo", description="torchao int4 weight-only (Int4WeightOnlyConfig)", bits=4,
              options={"config": "Int4WeightOnlyConfig"}, **(_TORCHAO | {"devices": ("cuda",), "lora": "",
              "no_lora_reason": "peft's torchao LoRA supports int8 weights only (int4 raises)", "device_reasons": {
                  "cpu": "torchao 0.18 Int4WeightOnlyConfig has no CPU kernel: packing formats plain/preshuffled "
                         "need mslk (CUDA), plain_int32 does not support device 'cpu', tile_packed_to_4d needs CUDA",
                  "xla": "torchao int4 has no XLA kernel"}})),
    # optimum-quanto (QBytesTensor / packed QTensor weights), through QuantoConfig(weights=...).
    Precision("quanto-int8", description="optimum-quanto int8 weights, one scale per row", bits=8,
              options={"weights": "int8"}, measured_loss=_loss(2.2e-5, 4.9e-4), **_QUANTO),
    Precision("quanto-int4", description="optimum-quanto int4 weights, groups of 128 with scale and shift", bits=4,
              options={"weights": "int4"}, measured_loss=_loss(3.0e-4), **_QUANTO),
    Precision("quanto-int2", description="optimum-quanto int2 weights, groups with scale and shift", bits=2,
              options={"weights": "int2"}, measured_loss=_loss(7.0e-3, 9.1e-1), **_QUANTO),
    Precision("quanto-fp8", description="optimum-quanto float8 (e4m3) weights, one scale per row", bits=8,
              options={"weights": "float8"}, measured_loss=_loss(4.0e-5, 1.9e-3), **_QUANTO),
    # HQQ: the hqq library runs on CPU (HQQLinear), but transformers 5 cannot load through HqqConfig
    # (harness.known_issues: its reproduction turns red when a release fixes it).
    Precision("hqq-int4", description="HQQ 4-bit, groups of 64 (HqqConfig)", bits=4,
              options={"nbits": 4, "group_size": 64}, **(_HQQ | {"devices": (), "device_reasons": dict.fromkeys(
                  ("cpu", "cuda", "xla"), KNOWN_ISSUES["transformers-hqq-load"].reason)})),
    # A checkpoint whose config.json carries a quantization_config, loaded as saved; its quality
    # reference is a separate full-precision model (--reference-model, or reference_model per model).
    Precision("as-saved", "pre-quantized", "the checkpoint's own quantization_config, loaded as saved",
              ("pytorch",), 0, storage_dtype="half", compute_dtype="half",
              quantizer="harness.backends.quantizers.saved", lora="kbit"),
    # llama.cpp GGUF types: converted once to f16 by llama.cpp's converter, then quantized with
    # llama_model_quantize. Bits are nominal: k-quants need rows that are multiples of 256, and
    # llama.cpp falls back to other types per tensor (the record's notes list what each got).
    Precision("gguf-f16", description="GGUF F16, the converter's baseline", bits=16, options={"ftype": "F16"},
              measured_loss=_loss(4.2e-8), **_GGUF),
    Precision("gguf-q8_0", description="GGUF Q8_0: 8-bit blocks of 32", bits=8.5, options={"ftype": "Q8_0"},
              measured_loss=_loss(1.5e-5), **_GGUF),
    Precision("gguf-q6_k", description="GGUF Q6_K k-quant", bits=6.56, options={"ftype": "Q6_K"},
              measured_loss=_loss(2.9e-5), **_GGUF),
    Precision("gguf-q5_k_m", description="GGUF Q5_K_M k-quant mix", bits=5.5, options={"ftype": "Q5_K_M"},
              measured_loss=_loss(1.8e-4), **_GGUF),
    Precision("gguf-q4_k_m", description="GGUF Q4_K_M k-quant mix", bits=4.85, options={"ftype": "Q4_K_M"},
              measured_loss=_loss(2.9e-4), **_GGUF),
    Precision("gguf-q4_0", description="GGUF Q4_0: 4-bit blocks of 32", bits=4.5, options={"ftype": "Q4_0"},
              measured_loss=_loss(6.2e-4), **_GGUF),
    Precision("gguf-q3_k_m", description="GGUF Q3_K_M k-quant mix", bits=3.9, options={"ftype": "Q3_K_M"},
              measured_loss=_loss(5.9e-4), **_GGUF),
    Precision("gguf-q2_k", description="GGUF Q2_K k-quant", bits=2.6, options={"ftype": "Q2_K"},
              measured_loss=_loss(7.1e-4), **_GGUF),
    Precision("keras-int8", description="Keras int8 weight quantization (model.quantize)", bits=8,
              options={"mode": "int8"}, measured_loss=_loss(1.0e-4, 2.6e-3), **_KERAS),
    Precision("keras-int4", description="Keras int4 weight quantization (model.quantize)", bits=4,
              options={"mode": "int4"}, measured_loss=_loss(1.7e-3, 4.8e-2), **_KERAS),
)  # fmt: skip


# --- lookup ------------------------------------------------------------------------------------


def _plugin_entries(attribute: str) -> tuple[Any, ...]:
    """Entries from the modules named in $HARNESS_PLUGINS (read at import, in parent and workers alike)."""
    entries: list[Any] = []
    for module_name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        entries.extend(getattr(importlib.import_module(module_name), attribute, ()))
    return tuple(entries)


def _by_name(entries: tuple[Any, ...]) -> Mapping[str, Any]:
    table: dict[str, Any] = {}
    for entry in entries:
        if entry.name in table:
            raise ValueError(f"{entry.name!r} is declared twice in the registry")
        table[entry.name] = entry
    return MappingProxyType(table)


FRAMEWORKS: Mapping[str, Framework] = _by_name((_PYTORCH, _TENSORFLOW, _JAX, _LLAMACPP, *_plugin_entries("FRAMEWORKS")))
PRECISIONS: Mapping[str, Precision] = _by_name((*_BUILTIN_PRECISIONS, *_plugin_entries("PRECISIONS")))
REFERENCE_FRAMEWORK: str = next(f.name for f in FRAMEWORKS.values() if f.reference)
DEFAULT_FRAMEWORKS: tuple[str, ...] = tuple(f.name for f in FRAMEWORKS.values() if f.default)
DEFAULT_PRECISIONS: tuple[str, ...] = tuple(p.name for p in PRECISIONS.values() if p.default)
REFERENCE_ORDER: tuple[str, ...] = tuple(
    p.name for p in sorted(PRECISIONS.values(), key=lambda p: p.reference_rank or 0) if p.reference_rank is not None
)


def precision_order(name: str) -> int:
    """Display rank: the declaration order; unknown names (older records) sort last."""
    names = list(PRECISIONS)
    return names.index(name) if name in names else len(names)


def family_of(name: str) -> str:
    """The family of a precision name, "unknown" for names this registry does not declare."""
    precision = PRECISIONS.get(name)
    return precision.family if precision else "unknown"


def lora_method(precision: str, rank: int) -> tuple[str | None, str]:
    """(plain | kbit | full, "") for a precision and LoRA rank, or (None, why it cannot train)."""
    spec = PRECISIONS[precision]
    if rank == 0:
        if spec.quantized:
            return None, (
                f"full fine-tuning (--lora-rank 0) needs trainable weights; {precision} ({spec.family}) "
                "stores frozen quantized ones: use --lora-rank 8 for (Q)LoRA"
            )
        return "full", ""
    if not spec.lora:
        return None, spec.no_lora_reason
    return spec.lora, ""


def training_skip_reason(framework: str, precision: str, model_kind: str | None, rank: int) -> str | None:
    """Why this combination has no training step (the finetune scenario), or None: every rule from
    the registry."""
    descriptor = FRAMEWORKS[framework]
    if descriptor.trainer is None:
        return descriptor.no_trainer_reason or f"{framework} has no trainer"
    if model_kind not in (None, "causal-lm"):
        return "the finetune scenario trains causal LMs (next-token loss); this model has no LM head to train"
    return lora_method(precision, rank)[1] or None


def load_object(path: str) -> Any:
    """Import `"module:attribute"` (the lazy form backends and quantizers are declared in)."""
    module_name, _, attribute = path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def quantizer_preload(precisions: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Per forkserver framework, the packages of the selected precisions (preloaded where no GPU is
    present: their imports may probe CUDA, which a forkserver must never initialize)."""
    preload: dict[str, tuple[str, ...]] = {}
    for name in precisions:
        precision = PRECISIONS[name]
        for framework in precision.frameworks:
            if FRAMEWORKS[framework].start_method == "forkserver":
                preload[framework] = tuple(dict.fromkeys((*preload.get(framework, ()), *precision.packages)))
    return preload


def all_packages() -> frozenset[str]:
    """Every import name any framework, device or precision needs (what Capabilities probes)."""
    names: set[str] = set()
    for framework in FRAMEWORKS.values():
        names |= set(framework.packages) | set(framework.trainer_packages)
        for packages in framework.device_packages.values():
            names |= set(packages)
    for precision in PRECISIONS.values():
        names |= set(precision.packages)
    return frozenset(names)
