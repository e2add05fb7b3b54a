"""The environment fingerprint: what machine and software stack produced a record.

Everything here is read without importing torch or initializing CUDA, so the parent process
stays light and never holds a CUDA context (NVML is a separate, fork-safe library).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness._version import __version__
from harness.nvml import nvml_session

LIBRARIES = (
    "torch",
    "transformers",
    "bitsandbytes",
    "accelerate",
    "safetensors",
    "tokenizers",
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "keras-hub",
    "torch_xla",
    "jax",
    "jaxlib",
    "torchao",
    "optimum-quanto",
    "hqq",
    "llama-cpp-python",
    "gguf",
    "pandas",
    "pytest-benchmark",
)
INTERESTING_CPU_FLAGS = re.compile(r"^(avx2|avx512.*|amx.*|fma|f16c|sse4_2)$")
# A machine class's name (e.g. a CI runner label) and the software stack's name (e.g. a tox env).
HARDWARE_LABEL_ENV = "HARNESS_HARDWARE_LABEL"
STACK_ENV = "HARNESS_STACK"


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML sees it."""

    index: int
    name: str
    memory_bytes: int
    compute_capability: str


@dataclass(frozen=True)
class Environment:
    """Hardware and software fingerprint of the machine a run happened on."""

    harness_version: str
    git_commit: str | None
    python: str
    os: str
    cpu_model: str
    cpu_count: int
    cpu_flags: list[str]
    ram_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)
    nvidia_driver: str | None = None
    cuda_driver_version: str | None = None
    torch_cuda_build: str | None = None
    libraries: dict[str, str] = field(default_factory=dict)
    hardware_name: str | None = None  # $HARNESS_HARDWARE_LABEL: names this machine class in reports
    stack: str | None = None  # $HARNESS_STACK: names the software stack (e.g. "min", "latest")

    @property
    def env_id(self) -> str:
        """Short stable hash of the whole fingerprint."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def hardware_id(self) -> str:
        """Short hash of the hardware part only (used to match runs across nights). A hardware
        name ($HARNESS_HARDWARE_LABEL) is part of it: two labels on one box are two machines."""
        hw = {
            "cpu_model": self.cpu_model,
            "cpu_count": self.cpu_count,
            "gpus": [(g.name, g.memory_bytes) for g in self.gpus],
        }
        if self.hardware_name:
            hw["name"] = self.hardware_name
        return hashlib.sha256(json.dumps(hw, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def hardware_label(self) -> str:
        """Human-readable hardware name for reports: $HARNESS_HARDWARE_LABEL, else CPU and GPUs."""
        if self.hardware_name:
            return self.hardware_name
        gpu = ", ".join(sorted({g.name for g in self.gpus}))
        return f"{self.cpu_model} x{self.cpu_count}" + (f" + {gpu}" if gpu else "")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["env_id"] = self.env_id
        data["hardware_id"] = self.hardware_id
        data["hardware_label"] = self.hardware_label
        return data


def cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = sorted(f for f in value.split() if INTERESTING_CPU_FLAGS.match(f))
    return model, flags


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def torch_cuda_build() -> str | None:
    """CUDA version torch was built with, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    version_file = Path(spec.origin).parent / "version.py"
    try:
        match = re.search(r"^cuda(?:: .*?)? = '([^']+)'", version_file.read_text(), re.M)
    except OSError:
        return None
    return match.group(1) if match else None


def probe_gpus() -> tuple[list[GpuInfo], str | None, str | None]:
    """NVIDIA GPUs, driver and CUDA driver version through NVML; empty where NVML is absent."""
    with nvml_session() as nvml:
        if nvml is None:
            return [], None, None
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(GpuInfo(index, str(name), int(memory), f"{major}.{minor}"))
        driver = str(nvml.nvmlSystemGetDriverVersion())
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        return gpus, driver, f"{cuda // 1000}.{(cuda % 1000) // 10}"


def collect_environment() -> Environment:
    """Read the fingerprint of this machine."""
    cpu_model, cpu_flags = cpu_info()
    gpus, driver, cuda = probe_gpus()
    return Environment(
        harness_version=__version__,
        git_commit=_git_commit(),
        python=platform.python_version(),
        os=f"{platform.system()} {platform.release()}",
        cpu_model=cpu_model,
        cpu_count=os.cpu_count() or 1,
        cpu_flags=cpu_flags,
        ram_bytes=_ram_bytes(),
        gpus=gpus,
        nvidia_driver=driver,
        cuda_driver_version=cuda,
        torch_cuda_build=torch_cuda_build(),
        libraries=_library_versions(),
        hardware_name=os.environ.get(HARDWARE_LABEL_ENV, "").strip() or None,
        stack=os.environ.get(STACK_ENV, "").strip() or None,
    )


def bf16_native(device: str, compute_capability: str | tuple[int, int] | None, cpu_bf16: bool) -> bool:
    """The one rule for "does this device run bf16 natively": CUDA compute capability 8.0 or newer
    (Ampere+), a CPU with AVX512-BF16 or AMX (`cpu_bf16`), and every XLA device (TPUs are bf16-first)."""
    kind = device.partition(":")[0]
    if kind == "cuda":
        if compute_capability is None:
            return False
        major, minor = (
            compute_capability if isinstance(compute_capability, tuple) else map(int, compute_capability.split("."))
        )
        return (major, minor) >= (8, 0)
    return cpu_bf16 if kind == "cpu" else True


def cpu_runs_bf16_well(cpu_flags: list[str]) -> bool:
    """bf16 arithmetic is native on CPUs with AVX512-BF16 or AMX; elsewhere it is emulated."""
    return any(f in cpu_flags for f in ("avx512_bf16", "amx_bf16"))
