"""Issue 22 item 2: each run option declared once (harness.options) and read the same way by `harness run`,
`harness plan`, the pytest plugin and a matrix file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from harness.cli import build_parser
from harness.environment import collect_environment
from harness.options import RunOptions, given_options, option_fields
from harness.plan.matrix import Capabilities
from harness.run.runner import Plan


def every_flag(tmp_path: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """(`harness run` arguments, the same under pytest, the RunOptions fields they set), giving every
    declared flag a value other than its default."""
    text = tmp_path / "eval.txt"
    text.write_text("some text\n")
    values: dict[str, tuple[str | None, Any]] = {  # field -> (argument, parsed value); None: a switch
        "repeats": ("5", 5), "timeout_s": ("90", 90.0), "memory_limit_bytes": ("3GiB", 3 << 30),
        "preflight": (None, False), "available_memory_bytes": ("512M", 512 << 20), "tokenizer": ("tok", "tok"),
        "allow_pickle": (None, True), "trust_remote_code": (None, True), "throughput": (None, False),
        "quality": (None, False), "roundtrip": (None, True), "prompt_lengths": ("32,64", (32, 64)),
        "batch_sizes": ("2,4", (2, 4)), "new_tokens": ("7", 7), "timing_repeats": ("4", 4),
        "time_budget_s": ("0.25", 0.25), "target_ci_rel": ("0.2", 0.2), "cold": (None, False),
        "eval_text": (str(text), text), "eval_tokens": ("99", 99), "reference": ("bf16", "bf16"),
        "reference_model": ("ref", "ref"), "scenario": ("finetune", "finetune"), "seq_len": ("32", 32),
        "lora_rank": ("4", 4), "lora_alpha": ("16", 16), "train_steps": ("3", 3), "learning_rate": ("0.01", 0.01),
        "gradient_checkpointing": ("off", False), "optimizer": ("adamw8bit", "adamw8bit"),
    }  # fmt: skip
    declared = {name: flag for name, _, flag in option_fields()}
    assert set(values) == set(declared), "give every declared flag a value here"
    cli, under_pytest = [], []
    for name, (argument, _) in values.items():
        flag = declared[name]
        tail = [argument] if argument is not None else []
        cli += [flag.flag, *tail]
        under_pytest += [flag.pytest_flag or flag.flag, *tail]
    return cli, under_pytest, {name: parsed for name, (_, parsed) in values.items()}


def test_every_flag_reaches_its_field_through_argparse_and_pytest(pytester: pytest.Pytester, tmp_path: Path) -> None:
    cli, under_pytest, expected = every_flag(tmp_path)
    defaults = RunOptions()
    assert all(getattr(defaults, name) != value for name, value in expected.items())
    from_cli = RunOptions(**given_options(vars(build_parser().parse_args(["run", *cli])).get))
    from_pytest = RunOptions(**given_options(pytester.parseconfig(*under_pytest).getoption))
    assert from_cli == from_pytest == dataclasses.replace(defaults, **expected)


def test_harness_plan_reads_only_the_options_a_plan_uses() -> None:
    args = build_parser().parse_args(["plan", "--finetune", "--seq-len", "32", "--gradient-checkpointing", "off"])
    assert given_options(vars(args).get, plan_only=True) == {"seq_len": 32, "gradient_checkpointing": False}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--no-cold"])  # the plan does not load anything


def test_harness_run_and_pytest_plan_the_same_matrix_file(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """`harness run --matrix` and `pytest --matrix`: the same axes, per-model axes and [options], and a
    flag given on the command line wins over the file."""
    matrix = tmp_path / "matrix.toml"
    matrix.write_text(
        'frameworks = ["pytorch"]\ndevices = ["cpu"]\nprecisions = ["fp32", "int8", "nf4"]\n'
        "[options]\ntimeout_s = 300\nnew_tokens = 8\n"
        '[models.tiny-llama]\nprecisions = ["fp32", "nf4"]\n[models.minilm]\n'
    )
    capabilities = Capabilities.detect(collect_environment())
    args = vars(build_parser().parse_args(["run", "--matrix", str(matrix), "--timeout", "100"]))
    run_plan = Plan.from_flags(args.get, capabilities)
    pytest_plan = Plan.from_flags(pytester.parseconfig("--matrix", str(matrix), "--worker-timeout", "100").getoption,
                                  capabilities)  # fmt: skip
    for plan in (run_plan, pytest_plan):
        assert {(c.model, c.precision) for c in plan.combos()} == {
            ("tiny-llama", "fp32"), ("tiny-llama", "nf4"), ("minilm", "fp32"), ("minilm", "int8"), ("minilm", "nf4"),
        }  # fmt: skip
        assert (plan.options.timeout_s, plan.options.new_tokens) == (100.0, 8)
