"""Shared fixtures: real runs of the zoo through the real runner and isolated workers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from harness.environment import collect_environment
from harness.options import RunOptions
from harness.plan.matrix import Selection
from harness.registry import DEFAULT_PRECISIONS
from harness.run.runner import Plan, Runner
from harness.storage import RunWriter, read_records
from harness.zoo import DEFAULT_MODELS, ensure_built

# Small but real settings: every measurement runs, just with fewer repeats and tokens.
FAST = dict(repeats=2, timing_repeats=2, min_timing_s=0.0, new_tokens=8, greedy_tokens=8, time_budget_s=0.3, cold=False)


def run_matrix(
    out: Path, models: tuple[str, ...], precisions: tuple[str, ...], run_id: str = "run", **options: Any
) -> list[dict[str, Any]]:
    """Run a CPU matrix through the real Runner and return the records read back from disk."""
    options = {"cold": False} | options  # the cold-load worker only where a test asks for it
    plan = Plan.create(Selection(models, ("pytorch",), precisions, ("cpu",)), RunOptions(**options))
    writer = RunWriter(out, collect_environment(), run_id)
    Runner(plan, writer).run(plan.combos())
    return read_records(writer.path)


def by_precision(records: list[dict[str, Any]], model: str) -> dict[str, dict[str, Any]]:
    return {r["precision"]: r for r in records if r["model"] == model}


@pytest.fixture(scope="session")
def zoo_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every zoo model in every PyTorch precision on CPU, with throughput and quality."""
    out = tmp_path_factory.mktemp("zoo-run")
    return run_matrix(out, DEFAULT_MODELS, DEFAULT_PRECISIONS, **FAST)


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    return ensure_built("tiny-llama")


def remote_code_checkpoint(root: Path, name: str, behaviour: str) -> Path:
    """A real checkpoint whose own modeling code (trust_remote_code) does `behaviour` on load."""
    source = ensure_built("tiny-llama")
    path = root / name
    path.mkdir(parents=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(source / file, path / file)
    config = {
        "model_type": f"harness-{name}",
        "architectures": ["FaultForCausalLM"],
        "auto_map": {"AutoConfig": "fault.FaultConfig", "AutoModelForCausalLM": "fault.FaultForCausalLM"},
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "fault.py").write_text(
        f"""
import ctypes, os, signal, time
from transformers import PretrainedConfig, PreTrainedModel


class FaultConfig(PretrainedConfig):
    model_type = "harness-{name}"


class FaultForCausalLM(PreTrainedModel):
    config_class = FaultConfig

    def __init__(self, config):
        super().__init__(config)
        {behaviour}
"""
    )
    return path


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
