"""The known upstream breaks (harness/known_issues.py): each reproduced for real, and the suites'
tests they fail marked as strict xfails, only where and while the installed release is affected."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from harness import known_issues
from harness.known_issues import ISSUES, KnownIssue, active, applies_here
from harness.registry import FRAMEWORKS, PRECISIONS

SUITES = Path(__file__).resolve().parent.parent / "suites"


class KnownIssueReproduced(Exception):
    """The reproduction failed the way its entry says: the break is still there."""


def suite_test_names() -> set[str]:
    return {
        node.name
        for path in SUITES.glob("test_*.py")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_entry_is_well_formed() -> None:
    assert len({i.id for i in ISSUES}) == len(ISSUES)
    names = suite_test_names()
    for issue in ISSUES:
        SpecifierSet(issue.affected)  # parses
        re.compile(issue.symptom)
        assert "\n" not in issue.reproduction and "\n" not in issue.reason, issue.id
        assert set(issue.suite_tests) <= names, (issue.id, set(issue.suite_tests) - names)
        assert set(issue.frameworks) <= set(FRAMEWORKS) and set(issue.precisions) <= set(PRECISIONS), issue.id
        assert set(issue.devices) <= {"cpu", "cuda", "xla"}, issue.id


@pytest.mark.slow
@pytest.mark.parametrize("issue", ISSUES, ids=lambda issue: issue.id)
def test_the_reproduction_shows_whether_it_is_still_broken(
    issue: KnownIssue, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Fails while the break is there: expected (strict xfail) in an affected release; a pass there,
    or the same failure in a release outside the range, means the table is out of date."""
    if not applies_here(issue):
        pytest.skip(f"{issue.package} is not installed" if issue.cpu_flag is None else f"needs a {issue.cpu_flag} CPU")
    if active(issue):
        request.applymarker(pytest.mark.xfail(strict=True, raises=KnownIssueReproduced, reason=issue.xfail_reason()))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(issue.command(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    if done.returncode != 0 and re.search(issue.symptom, output):
        raise KnownIssueReproduced(f"{issue.id}: {output.strip().splitlines()[-1]}")
    assert done.returncode == 0, output[-3000:]  # any other failure is a new one, never an expected xfail


def collect_suites(pytester: pytest.Pytester, *args: str) -> dict[str, pytest.Mark | None]:
    suites = pytester.path / "suites"
    if not suites.exists():
        shutil.copytree(SUITES, suites)
    items, _ = pytester.inline_genitems(str(suites / "test_compat.py"), "-p", "no:cacheprovider", *args)
    return {item.name: item.get_closest_marker("xfail") for item in items}


def test_the_suites_mark_what_an_active_issue_breaks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = {"keras": "3.15.1", "bitsandbytes": "0.50.2"}
    monkeypatch.setattr(known_issues, "installed_version", versions.get)
    monkeypatch.setattr(known_issues, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    args = ("--models", "tiny-llama-trained,minilm", "--frameworks", "pytorch,tensorflow",
            "--precisions", "fp32,nf4,keras-int4", "--devices", "cpu")  # fmt: skip
    marks = collect_suites(pytester, *args)
    marked = {name for name, mark in marks.items() if mark is not None}
    assert marked == {
        "test_survives_a_save_load_round_trip[tiny-llama-trained-tensorflow-keras-int4-cpu]",
        "test_survives_a_save_load_round_trip[tiny-llama-trained-pytorch-nf4-cpu]",
        "test_survives_a_save_load_round_trip[minilm-pytorch-nf4-cpu]",
    }  # not the encoder's keras-int4 (no output projection), not the other tests of those combinations
    mark = marks["test_survives_a_save_load_round_trip[tiny-llama-trained-pytorch-nf4-cpu]"]
    assert mark.kwargs["strict"] is True and mark.kwargs["raises"] is AssertionError
    assert mark.kwargs["reason"].startswith("known issue bnb-4bit-cpu-packed-save (bitsandbytes 0.50.2): ")

    # a release outside the range, or a CPU without the flag: no mark, the test must pass
    versions.update(keras="3.15.0")
    monkeypatch.setattr(known_issues, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert not any(collect_suites(pytester, *args).values())
