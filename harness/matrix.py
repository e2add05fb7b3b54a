"""The matrix: axes, the combinations they expand to, and why a combination cannot run here."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from harness.environment import Environment, GpuInfo, cpu_runs_bf16_well
from harness.errors import UsageError

FRAMEWORKS: tuple[str, ...] = ("pytorch", "tensorflow")
FRAMEWORK_PACKAGES: dict[str, tuple[str, ...]] = {
    "pytorch": ("torch", "transformers"),
    "tensorflow": ("tensorflow", "keras", "keras_hub"),
}


@dataclass(frozen=True)
class Precision:
    """A precision name and how it is produced."""

    name: str
    framework: str
    quantizer: str | None
    description: str


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "any", None, "float32 weights and compute"),
        Precision("fp16", "any", None, "float16 weights and compute"),
        Precision("bf16", "any", None, "bfloat16 weights and compute"),
        Precision("int8", "pytorch", "bitsandbytes", "LLM.int8() (bitsandbytes 8-bit)"),
        Precision("nf4", "pytorch", "bitsandbytes", "4-bit NF4 (bitsandbytes)"),
        Precision("nf4-dq", "pytorch", "bitsandbytes", "4-bit NF4 with double quantization"),
        Precision("fp4", "pytorch", "bitsandbytes", "4-bit FP4 (bitsandbytes)"),
        Precision("keras-int8", "tensorflow", "keras", "Keras int8 weight quantization"),
        Precision("keras-int4", "tensorflow", "keras", "Keras int4 weight quantization"),
    )
}
# TensorFlow is opt-in (`--frameworks pytorch,tensorflow`): its workers are spawned, each paying
# a ~8 s import, which would triple the default matrix's time.
DEFAULT_FRAMEWORKS: tuple[str, ...] = ("pytorch",)
BNB_4BIT = ("nf4", "nf4-dq", "fp4")
DEFAULT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "nf4", "nf4-dq", "fp4")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|xla(:\d+)?)$")


def torch_dtypes(precision: str, fast_bf16: bool) -> tuple[str, str]:
    """(storage dtype of unquantized tensors, compute dtype) of a PyTorch precision, as names.

    Quantized precisions keep embeddings, norms and head in 16-bit: bf16 where the device runs
    it natively, else fp16; LLM.int8() multiplies in fp16, so int8 is always fp16. 4-bit layers
    compute in bf16 where native, else fp32. Read by the backend (to load) and the memory plan.
    """
    if precision in ("fp32", "fp16", "bf16"):
        name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
        return name, name
    if precision == "int8":
        return "float16", "float16"
    if precision in BNB_4BIT:
        return ("bfloat16", "bfloat16") if fast_bf16 else ("float16", "float32")
    raise ValueError(f"precision {precision} is not a PyTorch precision")


@dataclass(frozen=True, order=True)
class Combo:
    """One (model, framework, precision, device) combination."""

    model: str
    framework: str
    precision: str
    device: str

    @property
    def id(self) -> str:
        """Readable, stable test id, e.g. `tiny-llama-pytorch-nf4-cpu`."""
        return f"{self.model}-{self.framework}-{self.precision}-{self.device}"


@dataclass(frozen=True)
class Capabilities:
    """What this machine can run, read without importing frameworks or touching CUDA."""

    gpus: tuple[GpuInfo, ...]
    torch_cuda_build: str | None
    installed: frozenset[str]
    cpu_bf16: bool
    tensorflow_gpu_build: bool = False  # the `tensorflow` wheel, not `tensorflow-cpu`

    @classmethod
    def detect(cls, env: Environment) -> Capabilities:
        names = {"torch", "transformers", "bitsandbytes", "tensorflow", "keras", "keras_hub"}
        names |= {"torch_xla"}
        installed = frozenset(n for n in names if importlib.util.find_spec(n) is not None)
        tf_gpu = "tensorflow" in env.libraries
        return cls(tuple(env.gpus), env.torch_cuda_build, installed, cpu_runs_bf16_well(env.cpu_flags), tf_gpu)

    def gpu(self, device: str) -> GpuInfo | None:
        index = int(device.partition(":")[2] or 0)
        return self.gpus[index] if index < len(self.gpus) else None

    def runs_bf16_well(self, device: str) -> bool:
        """bf16 is native on Ampere+ GPUs and on CPUs with AVX512-BF16/AMX."""
        if device.startswith("cuda"):
            gpu = self.gpu(device)
            return gpu is not None and float(gpu.compute_capability) >= 8.0
        return self.cpu_bf16


def framework_missing(framework: str, caps: Capabilities) -> str | None:
    missing = [p for p in FRAMEWORK_PACKAGES[framework] if p not in caps.installed]
    if missing:
        extra = "torch" if framework == "pytorch" else "tf"
        return f"{framework} needs {', '.join(missing)}: pip install 'harness[{extra}]'"
    return None


def unsupported_reason(combo: Combo, caps: Capabilities) -> str | None:
    """Why `combo` cannot run on this machine, or None when it can."""
    precision = PRECISIONS[combo.precision]
    reason = framework_missing(combo.framework, caps)
    if reason:
        return reason
    if precision.framework not in ("any", combo.framework):
        if precision.quantizer == "bitsandbytes":
            return (
                f"{combo.precision} is bitsandbytes, which quantizes PyTorch modules only; use keras-int8 or keras-int4"
            )
        return f"{combo.precision} is Keras's own quantization; use int8, nf4, nf4-dq or fp4 with pytorch"
    device = combo.device
    if device.startswith("xla"):
        if combo.framework != "pytorch":
            return "xla devices are reached through torch_xla (PyTorch) only"
        if "torch_xla" not in caps.installed:
            return "torch_xla is not installed (needed for TPUs): pip install torch_xla"
        if precision.quantizer == "bitsandbytes":
            return "bitsandbytes has no XLA backend"
    if device.startswith("cuda"):
        if not caps.gpus:
            return "no CUDA GPU on this machine (NVML finds none)"
        gpu = caps.gpu(device)
        if gpu is None:
            return f"{device} does not exist: this machine has {len(caps.gpus)} GPU(s)"
        if combo.framework == "pytorch" and caps.torch_cuda_build is None:
            return "the installed torch is a CPU build: install a CUDA build of torch"
        if combo.framework == "tensorflow" and not caps.tensorflow_gpu_build:
            return "tensorflow-cpu has no GPU support: pip install 'tensorflow[and-cuda]'"
        cc = float(gpu.compute_capability)
        if combo.precision == "int8" and cc < 7.5:
            return f"LLM.int8() needs compute capability >= 7.5; {gpu.name} has {cc}"
        if combo.precision == "bf16" and cc < 8.0:
            return f"bf16 needs compute capability >= 8.0; {gpu.name} has {cc}"
    if precision.quantizer == "bitsandbytes" and "bitsandbytes" not in caps.installed:
        return "bitsandbytes is not installed: pip install 'harness[quant]'"
    return None


def default_devices(caps: Capabilities) -> tuple[str, ...]:
    """cpu, plus cuda where a GPU is present."""
    return ("cpu", "cuda") if caps.gpus else ("cpu",)


def _check_names(kind: str, values: tuple[str, ...], known: tuple[str, ...] | dict) -> None:
    for value in values:
        if value not in known:
            raise UsageError(f"unknown {kind} '{value}': use one of {', '.join(known)}")


@dataclass(frozen=True)
class Selection:
    """The user's choice along each axis, validated on creation."""

    models: tuple[str, ...]
    frameworks: tuple[str, ...]
    precisions: tuple[str, ...]
    devices: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_names("framework", self.frameworks, FRAMEWORKS)
        _check_names("precision", self.precisions, PRECISIONS)
        for device in self.devices:
            if not DEVICE_PATTERN.match(device):
                raise UsageError(f"unknown device '{device}': use cpu, cuda, cuda:N or xla")
        for axis in ("models", "frameworks", "precisions", "devices"):
            if not getattr(self, axis):
                raise UsageError(f"--{axis} is empty: name at least one")

    @classmethod
    def from_lists(
        cls,
        models: str | None,
        frameworks: str | None,
        precisions: str | None,
        devices: str | None,
        caps: Capabilities,
    ) -> Selection:
        """From comma lists (CLI, pytest options, matrix file); a missing axis takes its default."""
        from harness.zoo import DEFAULT_MODELS

        return cls(
            models=split_list(models) or DEFAULT_MODELS,
            frameworks=split_list(frameworks) or DEFAULT_FRAMEWORKS,
            precisions=split_list(precisions) or DEFAULT_PRECISIONS,
            devices=split_list(devices) or default_devices(caps),
        )

    def combos(self) -> list[Combo]:
        """Every combination, in a stable order: model, framework, device, then precision."""
        return [
            Combo(m, f, p, d)
            for m in self.models
            for f in self.frameworks
            for d in self.devices
            for p in self.precisions
        ]


def split_list(value: str | None) -> tuple[str, ...] | None:
    """`a,b , c` -> ("a", "b", "c"); None stays None."""
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())
