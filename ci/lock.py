"""Write constraints.txt: the exact release of every distribution in this environment, once its tests pass.

    .tox/test/bin/python ci/lock.py           # after `python3 -m tox -e test` passed: rewrite constraints.txt
    .tox/test/bin/python ci/lock.py --check   # exit 1 when constraints.txt differs from this environment

tox's run, test, suites, lint and nightly envs install through it (PIP_CONSTRAINT in tox.ini), so a
fresh clone gets the set the tests passed with, whatever was released since; the nightly's
`stack-latest` env stays unconstrained and keeps testing the newest releases. Left out: the harness
itself; torch, which tox.ini pins (HARNESS_TORCH_SPEC picks the build), and what only a CUDA build
of torch brings (nvidia-*, triton); pip, setuptools and wheel. Local version labels are dropped
(torch's `2.13.0+cpu` is `2.13.0`), so every build of a pinned release satisfies it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import re
import sys
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
LEFT_OUT = re.compile(r"^(harness|torch|triton|pip|setuptools|wheel|nvidia-.*)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> list[str]:
    """`name==version` for every distribution this interpreter imports from, sorted by name."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and not LEFT_OUT.match(normalize(name)):
            found.setdefault(normalize(name), dist.version.split("+", 1)[0])
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def text() -> str:
    python = ".".join(platform.python_version_tuple()[:2])
    header = [
        "# The tested set: what `python3 -m tox -e test` passed with (Python "
        f"{python}, {platform.system()} {platform.machine()}).",
        "# tox installs through it (PIP_CONSTRAINT). Regenerate from a passing env: .tox/test/bin/python ci/lock.py",
    ]
    return "\n".join([*header, *pins()]) + "\n"


def body(content: str) -> list[str]:
    return [line for line in content.splitlines() if line and not line.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on a difference")
    parser.add_argument("--out", type=Path, default=CONSTRAINTS)
    args = parser.parse_args(argv)
    new = text()
    if args.check:
        old = body(args.out.read_text()) if args.out.exists() else []
        removed, added = sorted(set(old) - set(body(new))), sorted(set(body(new)) - set(old))
        for line in removed:
            print(f"- {line}")
        for line in added:
            print(f"+ {line}")
        return 1 if removed or added else 0
    args.out.write_text(new)
    print(f"{args.out}: {len(body(new))} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
