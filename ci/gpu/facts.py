"""Print what this machine has for the harness, without importing torch (a cheap first look).

    python3 ci/gpu/facts.py [--freeze FILE]

Prints python, platform, the CUDA build torch was compiled for (read from torch/version.py), the
NVIDIA GPUs NVML sees, and for each of the harness's requirements (pyproject core + torch +
quant extras) the installed version or MISSING. With --freeze, also writes `name==version` for
every installed distribution: the input `build_wheelhouse.py --image-packages` wants after the
image changes. Exit code 0 always; the missing list is the information.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packages import REPO_ROOT, gpu_requirements, installed_packages, missing_from, normalize


def gpu_lines() -> list[str]:
    """torch's CUDA build and one line per GPU through NVML, or why there is none."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from harness.environment import probe_gpus, torch_cuda_build
    except ImportError as exc:
        return [f"gpus: harness not importable ({exc})"]
    lines = [f"torch built for CUDA {torch_cuda_build() or 'none (CPU build or no torch)'}"]
    gpus, driver, cuda = probe_gpus()
    if not gpus:
        return [*lines, "gpus: none (NVML absent or sees no GPU)"]
    lines.append(f"nvidia driver {driver}, CUDA driver API {cuda}")
    lines += [f"gpu {g.index}: {g.name}, {g.memory_bytes / 2**30:.1f} GiB, compute capability {g.compute_capability}"
              for g in gpus]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freeze", type=Path, help="write name==version of every installed distribution here")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()} at {sys.executable}")
    print(f"platform {platform.platform()}, {platform.machine()}")
    for line in gpu_lines():
        print(line)
    present = installed_packages()
    requirements = gpu_requirements()
    missing = {normalize(r.name) for r in missing_from(requirements, present)}
    for requirement in requirements:
        name = normalize(requirement.name)
        state = "MISSING" if name not in present else present[name]
        flag = "  <- carry" if name in missing else ""
        print(f"  {name:20} {state or '?':14} needs {requirement.specifier or 'any'}{flag}")
    print(f"missing: {', '.join(sorted(missing)) or 'none'}")
    if args.freeze:
        args.freeze.write_text("".join(f"{n}=={v}\n" for n, v in sorted(present.items()) if v))
        print(f"wrote {args.freeze} ({len(present)} distributions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
