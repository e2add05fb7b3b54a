"""Build the wheelhouse the offline GPU run installs from (run on the CPU machine, with the registry).

    python ci/gpu/build_wheelhouse.py [--out ci/gpu/wheelhouse] [--image-packages ci/gpu/image-packages.txt]
                                      [--no-zoo] [--limit-mib 64] [--dry-run]

1. Needs: the harness's requirements from pyproject.toml (core + `torch` + `quant` extras).
2. Lacks: those the GPU image does not have (or has outside the required range), read from
   --image-packages (a pip freeze of the lent machine, or the name list in ci/gpu/image-packages.txt).
   torch is never carried. Each missing package is pinned to the version installed here, so the
   GPU runs what the CPU tests ran, and downloaded as a cp312 manylinux x86_64 wheel
   (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`); its own
   Requires-Dist are checked against the image the same way, recursively.
3. The harness itself as a wheel (`pip wheel --no-deps --no-build-isolation .`): the fallback
   when the GPU side cannot build the working tree, and what the offline-install test installs.
4. With the zoo (default): `zoo.tar` holding the trained `tiny-llama-trained` checkpoint and the
   zoo tokenizer, so the GPU machine neither trains (about 30 s there) nor measures other weights.
5. The size check: wheelhouse + the working tree that travels must fit the device tool's 64 MiB.

The new wheelhouse replaces the old one only when the whole build and the size check succeed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packages import (
    GPU_MARKER_ENV,
    NEVER_CARRIED,
    REPO_ROOT,
    gpu_requirements,
    installed_packages,
    missing_from,
    normalize,
    read_image_packages,
    satisfied,
)
from packaging.requirements import Requirement

MIB = 1 << 20
CARRY_LIMIT_BYTES = 64 * MIB  # the device tool's limit on what travels (working tree + carried paths)
DEFAULT_OUT = REPO_ROOT / "ci" / "gpu" / "wheelhouse"
DEFAULT_IMAGE_PACKAGES = REPO_ROOT / "ci" / "gpu" / "image-packages.txt"
ZOO_TAR = "zoo.tar"
ZOO_CARRIED = ("_tokenizer", "tiny-llama-trained")  # the one zoo model that needs training
# pip matches manylinux_2_N exactly, so name every N a wheel may carry (README of the device tool).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


class CarryTooLarge(Exception):
    """What would travel to the GPU machine is over the limit."""


def tree_files(repo: Path = REPO_ROOT) -> list[Path]:
    """Files of the working tree that travel: tracked plus untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [repo / name for name in out.stdout.split("\0") if name and (repo / name).is_file()]


def folder_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def check_carry_size(carried: list[Path], tree: list[Path], limit_bytes: int = CARRY_LIMIT_BYTES) -> int:
    """Total bytes of the carried files plus the working tree; raises CarryTooLarge over the limit."""
    sizes = {path: path.stat().st_size for path in {*carried, *tree}}
    total = sum(sizes.values())
    if total > limit_bytes:
        biggest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
        listing = ", ".join(f"{p.name} {size / MIB:.1f} MiB" for p, size in biggest)
        raise CarryTooLarge(
            f"{total / MIB:.1f} MiB would travel (wheelhouse + working tree), over the "
            f"{limit_bytes / MIB:.0f} MiB limit; largest: {listing}. Drop the zoo (--no-zoo) or carry fewer wheels."
        )
    return total


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """A wheel's Requires-Dist that apply on the GPU machine (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    env = GPU_MARKER_ENV | {"extra": ""}
    return [r for r in requirements if r.marker is None or r.marker.evaluate(env)]


def pin(requirement: Requirement, local: dict[str, str | None]) -> str:
    """`name==version` installed here when it satisfies the requirement, else the requirement itself."""
    version = local.get(normalize(requirement.name))
    if version and "+" not in version and satisfied(requirement, version):
        return f"{requirement.name}=={version}"
    return str(requirement.name) + str(requirement.specifier)


def download(spec: str, dest: Path) -> Path:
    """One cp312 manylinux x86_64 (or pure) wheel of `spec`, without dependencies."""
    before = set(dest.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, spec], check=True)
    new = set(dest.glob("*.whl")) - before
    if len(new) != 1:
        raise RuntimeError(f"pip download {spec} gave {len(new)} new wheels")
    return new.pop()


def wheels_to_carry(image: dict[str, str | None], local: dict[str, str | None], dest: Path) -> list[Path]:
    """Download every requirement the image lacks, then whatever those wheels need that it lacks too."""
    pending = missing_from(gpu_requirements(), image)
    done: set[str] = set()
    wheels = []
    while pending:
        requirement = pending.pop(0)
        name = normalize(requirement.name)
        if name in done:
            continue
        done.add(name)
        if name in NEVER_CARRIED:
            raise RuntimeError(
                f"the GPU image lacks {requirement}: torch is never carried (its CUDA build is measured)"
            )
        print(f"carry {pin(requirement, local)} (image has {image.get(name, 'none')})", flush=True)
        wheel = download(pin(requirement, local), dest)
        wheels.append(wheel)
        pending += [r for r in missing_from(wheel_requirements(wheel), image) if normalize(r.name) not in done]
    return wheels


def build_harness_wheel(dest: Path, repo: Path = REPO_ROOT) -> Path:
    """The harness as a wheel, built from the working tree without the registry."""
    before = set(dest.glob("harness-*.whl"))
    with tempfile.TemporaryDirectory(prefix="harness-wheel-build-") as build_dir:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", str(dest), str(repo)],
            check=True, cwd=build_dir,
        )  # fmt: skip
    new = set(dest.glob("harness-*.whl")) - before
    if len(new) != 1:
        raise RuntimeError(f"pip wheel built {len(new)} harness wheels")
    return new.pop()


def pack_zoo(dest: Path) -> Path:
    """zoo.tar with the trained zoo model and the zoo tokenizer (built here first if needed)."""
    sys.path.insert(0, str(REPO_ROOT))
    from harness import zoo

    zoo.ensure_built("tiny-llama-trained")
    tar_path = dest / ZOO_TAR
    with tarfile.open(tar_path, "w") as archive:
        for name in ZOO_CARRIED:
            archive.add(zoo.zoo_dir() / name, arcname=name)
    return tar_path


def build(out: Path, image_packages: Path, with_zoo: bool, limit_bytes: int, dry_run: bool = False) -> int:
    """Build into a temporary folder, check the size, then replace `out`. Returns the bytes that travel."""
    image = read_image_packages(image_packages)
    local = installed_packages()
    if dry_run:
        lacking = missing_from(gpu_requirements(), image)
        print("would carry:", ", ".join(pin(r, local) for r in lacking) or "nothing", "+ the harness wheel")
        return 0
    staging = Path(tempfile.mkdtemp(prefix="wheelhouse-"))  # outside the tree: a stale copy never travels
    try:
        wheels_to_carry(image, local, staging)
        build_harness_wheel(staging)
        if with_zoo:
            pack_zoo(staging)
        tree = [p for p in tree_files() if out not in p.parents]
        total = check_carry_size(folder_files(staging), tree, limit_bytes)
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for path in sorted(folder_files(out)):
        print(f"  {path.name:70} {path.stat().st_size / MIB:7.2f} MiB")
    print(f"{out}: {total / MIB:.1f} MiB travel with the working tree (limit {limit_bytes / MIB:.0f} MiB)")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="wheelhouse folder (git-ignored)")
    parser.add_argument("--image-packages", type=Path, default=DEFAULT_IMAGE_PACKAGES,
                        help="the GPU image's packages: pip freeze or a name list")  # fmt: skip
    parser.add_argument("--no-zoo", action="store_true", help="do not carry the trained zoo model")
    parser.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_BYTES / MIB, help="size limit (default 64)")
    parser.add_argument("--dry-run", action="store_true", help="only say what would be carried")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.image_packages, not args.no_zoo, int(args.limit_mib * MIB), args.dry_run)
    except CarryTooLarge as exc:
        print(f"build_wheelhouse: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
