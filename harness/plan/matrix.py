"""The matrix: axes, the combinations they expand to, and why a combination cannot run here."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from harness.environment import Environment, GpuInfo, bf16_native, cpu_runs_bf16_well
from harness.errors import UsageError
from harness.registry import DEFAULT_FRAMEWORKS, DEFAULT_PRECISIONS, FRAMEWORKS, PRECISIONS, all_packages

DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|xla(:\d+)?)$")


def combo_id(model: str, framework: str, precision: str, device: str) -> str:
    """The one id format of a combination (logs, test ids, printed tables): model-framework-precision-device."""
    return f"{model}-{framework}-{precision}-{device}"


@dataclass(frozen=True, order=True)
class Combo:
    """One (model, framework, precision, device) combination."""

    model: str
    framework: str
    precision: str
    device: str

    @property
    def id(self) -> str:
        """Readable, stable id, e.g. `tiny-llama-pytorch-nf4-cpu`."""
        return combo_id(self.model, self.framework, self.precision, self.device)


@dataclass(frozen=True)
class Capabilities:
    """What this machine can run, read without importing frameworks or touching CUDA."""

    gpus: tuple[GpuInfo, ...]
    torch_cuda_build: str | None
    installed: frozenset[str]
    cpu_bf16: bool
    tensorflow_gpu_build: bool = False  # the `tensorflow` wheel, not `tensorflow-cpu`
    jax_cuda_build: bool = False  # a jax CUDA plugin is installed (jax_cuda12_plugin / jax_cuda13_plugin)
    llamacpp_cuda_build: bool = False  # llama-cpp-python was built with GGML_CUDA (ships libggml-cuda)

    @classmethod
    def detect(cls, env: Environment) -> Capabilities:
        installed = frozenset(n for n in all_packages() if is_installed(n))
        tf_gpu = "tensorflow" in env.libraries
        jax_cuda = any(is_installed(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
        return cls(tuple(env.gpus), env.torch_cuda_build, installed, cpu_runs_bf16_well(env.cpu_flags), tf_gpu,
                   jax_cuda, _llamacpp_has_cuda())  # fmt: skip

    def gpu(self, device: str) -> GpuInfo | None:
        index = int(device.partition(":")[2] or 0)
        return self.gpus[index] if index < len(self.gpus) else None

    def runs_bf16_well(self, device: str) -> bool:
        """bf16 is native on Ampere+ GPUs and on CPUs with AVX512-BF16/AMX."""
        gpu = self.gpu(device) if device.startswith("cuda") else None
        capability = gpu.compute_capability if gpu else None
        return bf16_native(device, capability, self.cpu_bf16)


def is_installed(name: str) -> bool:
    """Whether `name` (a dotted import name, e.g. optimum.quanto) can be imported, without importing
    it (only a dotted name's parent packages are imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (optimum for optimum.quanto)
        return False


def _llamacpp_has_cuda() -> bool:
    """A CUDA build of llama-cpp-python ships libggml-cuda beside its module (found without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return False
    return any(Path(spec.origin).parent.glob("lib/libggml-cuda*"))


def _missing(packages: tuple[str, ...], caps: Capabilities) -> list[str]:
    return [p for p in packages if p not in caps.installed]


def unsupported_reason(combo: Combo, caps: Capabilities) -> str | None:
    """Why `combo` cannot run on this machine, or None when it can: every rule read from the registry."""
    framework, precision = FRAMEWORKS[combo.framework], PRECISIONS[combo.precision]
    missing = _missing(framework.packages, caps)
    if missing:
        return f"{framework.name} needs {', '.join(missing)}: pip install 'harness[{framework.extra}]'"
    if combo.framework not in precision.frameworks:
        others = [p.name for p in PRECISIONS.values() if combo.framework in p.frameworks and p.quantized]
        return (
            f"{combo.precision} ({precision.family}) runs on {', '.join(precision.frameworks)} only;"
            f" {combo.framework} offers {', '.join(others) or 'no quantized precision'}"
        )
    kind = combo.device.partition(":")[0]
    if kind not in framework.devices:
        return f"{framework.name} does not reach {kind} devices here (it runs on {', '.join(framework.devices)})"
    missing = _missing(framework.device_packages.get(kind, ()), caps)
    if missing:
        return f"{kind} devices need {', '.join(missing)} with {framework.name}: pip install {' '.join(missing)}"
    if kind not in precision.devices:
        return precision.device_reasons.get(kind, f"{combo.precision} does not run on {kind} devices")
    if kind == "cuda":
        if not caps.gpus:
            return "no CUDA GPU on this machine (NVML finds none)"
        gpu = caps.gpu(combo.device)
        if gpu is None:
            return f"{combo.device} does not exist: this machine has {len(caps.gpus)} GPU(s)"
        if framework.cuda_build and not getattr(caps, framework.cuda_build):
            return framework.no_cuda_build_reason
        cc = float(gpu.compute_capability)
        if precision.min_compute_capability and cc < precision.min_compute_capability:
            return (
                f"{combo.precision} needs compute capability >= {precision.min_compute_capability}; {gpu.name} has {cc}"
            )
    missing = _missing(precision.packages, caps)
    if missing:
        extra = f"'harness[{precision.extra}]'" if precision.extra else " ".join(missing)
        return f"{combo.precision} needs {', '.join(missing)}: pip install {extra}"
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
