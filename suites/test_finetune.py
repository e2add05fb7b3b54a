"""Fine-tuning (`pytest suites/ -m finetune`, or `--scenario finetune`): one LoRA/QLoRA training run per
combination (harness.measure.finetune). Does it learn, does its adapter reload and merge, did the training
memory plan hold? With --benchmark, pytest-benchmark stores the worker's timed steps.

Settings (seq_len, lora_rank, train_steps, learning_rate, gradient_checkpointing, optimizer) come
from the matrix file's [options]; budgets max_train_step_s, min_train_tok_s, max_train_peak_bytes
from its [budgets].
"""

import pytest

from harness.checks import adapter_problems, budget_problems, plan_problems, training_problems
from harness.zoo import ZOO

pytestmark = pytest.mark.finetune


def test_trains(finetune_record):
    problems = training_problems(finetune_record)
    assert not problems, problems


def test_adapter_reloads_and_merges(finetune_record):
    # merged weights are requantized: on random weights (near-uniform outputs) that moves KL arbitrarily,
    # as the agreement test says for inference; their adapters must still reload exactly
    zoo_entry = ZOO.get(finetune_record["model"])
    problems = adapter_problems(finetune_record, check_merge=zoo_entry is None or zoo_entry.trained)
    assert not problems, problems


def test_training_memory_matches_the_plan(finetune_record):
    problems = plan_problems(finetune_record)
    assert not problems, problems


@pytest.mark.harness_benchmark
def test_train_step(finetune_record, harness_session, finetune_benchmark):
    finetune_benchmark("train_step")
    problems = budget_problems(
        finetune_record,
        harness_session.budgets_for(finetune_record["model"]),
        ("max_train_step_s", "min_train_tok_s", "max_train_peak_bytes"),
    )
    assert not problems, problems
