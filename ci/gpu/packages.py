"""Which Python packages the harness needs on the GPU machine, and which of them its image lacks.

Shared by `facts.py` (run there: what is present) and `build_wheelhouse.py` (run here: what to
carry). The needs come from pyproject.toml (core dependencies plus the `torch` and `quant`
extras), so there is one list of dependencies, not two. torch itself is never carried: the
image's CUDA build is the one to measure.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parents[2]
GPU_EXTRAS = ("torch", "quant")  # pyproject extras the GPU run needs besides the core dependencies
NEVER_CARRIED = ("torch",)  # the image's own CUDA build is the thing measured
# What the lent machine's Python 3.12 reports for marker evaluation (pip download --python-version 3.12).
GPU_MARKER_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def normalize(name: str) -> str:
    """PEP 503 name: `Pytest_Benchmark` -> `pytest-benchmark`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[Requirement]:
    """The harness's requirements for a PyTorch + bitsandbytes run, from pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in GPU_EXTRAS:
        lines += project["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(GPU_MARKER_ENV)]


def read_image_packages(path: Path) -> dict[str, str | None]:
    """`name==version` or bare `name` lines (pip freeze or a name list) -> {normalized name: version}."""
    packages: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        if " @ " in name:  # `name @ file:///...` from pip freeze
            name, version = name.split(" @ ", 1)[0], ""
        packages[normalize(name.strip())] = version.strip() or None
    return packages


def satisfied(requirement: Requirement, version: str | None) -> bool:
    """Does an installed `version` (None: present, version unknown) meet the requirement?"""
    if version is None:
        return True
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True


def missing_from(requirements: list[Requirement], present: dict[str, str | None]) -> list[Requirement]:
    """The requirements a machine with `present` packages lacks (absent, or a version outside the range)."""
    return [r for r in requirements if normalize(r.name) not in present or not satisfied(r, present[normalize(r.name)])]


def installed_packages() -> dict[str, str | None]:
    """Every distribution importable by this interpreter, as {normalized name: version}."""
    return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}
