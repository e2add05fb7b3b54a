"""`--shard I/N`: a deterministic, disjoint split of the matrix, balanced by predicted cost.

Every machine of a CI matrix computes the same split on its own, so the cost of a combination
must depend only on the combination, the run options and the model's files, never on the
machine: `combo_cost` predicts seconds from the checkpoint's bytes on disk (a zoo model is built
first, deterministically), the model kind, and how many loads and generated tokens the options
ask for. It is the one place to swap in a better prediction (e.g. the memory plan's bytes).

The split keeps each model's combinations on one device together where it can, since a shard
that lacks a model's reference precision loads the reference once more for quality. It is a pure
function of the combinations and their costs, so it is the same on every call and machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.checkpoint import weight_files
from harness.errors import UsageError
from harness.options import RunOptions
from harness.plan.matrix import Combo
from harness.plan.models import ModelSource, materialize

SHARD_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
UNKNOWN_MODEL_BYTES = 1 << 30  # weights not on disk (yet): priced as a 1 GiB checkpoint
# Rough rates of the cost model, fitted to the default matrix on a 2-core CPU (worker_wall_s of
# the zoo: encoders ~5-10 s, tiny causal LMs ~20-30 s, dominated by generate's per-step cost).
# Only ratios between combinations matter: the same rates split a GPU machine's matrix.
WORKER_S = 1.5  # a fresh worker: start, first forward, bookkeeping
LOAD_BYTES_S = 1e9  # from_pretrained, conversion and quantization included
STEP_S = 0.03  # one generate step of a small model (framework overhead)
STEP_BYTES_S = 5e9  # one generate step reads every weight once


def parse_shard(text: str) -> tuple[int, int]:
    """`2/4` -> (2, 4): the second of four shards, counted from 1."""
    match = SHARD_PATTERN.match(text or "")
    if not match:
        raise UsageError(f"--shard '{text}': give I/N, e.g. 1/2 for the first of two shards")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise UsageError(f"--shard {text}: I must be between 1 and N (got {index} of {count})")
    return index, count


def checkpoint_bytes(model: ModelSource) -> int | None:
    """Bytes of the weight files the model's workers will read (a zoo model is built first);
    None when they are not on disk."""
    source = materialize(model)
    if not source.is_local or not Path(source.source).is_dir():
        return None
    try:
        files = weight_files(source.source, allow_pickle=True)
    except FileNotFoundError:
        return None
    return sum(f.stat().st_size for f in files) or None


def generated_tokens(options: RunOptions) -> int:
    """Tokens a causal LM's worker generates: timed decode (with warm-up) and the greedy prompts."""
    decode = options.new_tokens * (options.timing_repeats + options.warmup) * len(options.batch_sizes)
    decode *= len(options.prompt_lengths)
    return (decode if options.throughput else 0) + (
        options.greedy_prompts * options.greedy_tokens if options.quality else 0
    )


def combo_cost(combo: Combo, model_bytes: int | None, kind: str | None, options: RunOptions) -> float:
    """Predicted seconds of one combination: `repeats` fresh loads of the checkpoint, plus, for a
    causal LM, every generated token (a fixed step cost and one read of the weights)."""
    size = model_bytes if model_bytes is not None else UNKNOWN_MODEL_BYTES
    loads = options.repeats * (WORKER_S + size / LOAD_BYTES_S)
    tokens = generated_tokens(options) if kind == "causal-lm" else 0
    return loads + tokens * (STEP_S + size / STEP_BYTES_S)


def partition(combos: Sequence[Combo], count: int, cost: Callable[[Combo], float]) -> list[list[Combo]]:
    """All `count` shards: disjoint, together exactly `combos`, each in the input order.

    The combinations, each model's on one device together, are laid end to end by cost and cut
    into `count` equal lengths; a combination goes to the shard its midpoint falls in. So each
    shard is within one combination's cost of a fair share, and at most `count - 1` groups are
    cut (each cut costs that group one more reference load)."""
    if count < 1:
        raise UsageError(f"--shard needs at least one shard, got {count}")
    costs = [cost(c) for c in combos]
    share = sum(costs) / count
    members: list[list[int]] = [[] for _ in range(count)]
    laid = 0.0
    for position in sorted(range(len(combos)), key=lambda i: (combos[i].model, combos[i].device, i)):
        shard = min(count - 1, int((laid + costs[position] / 2) // share)) if share > 0 else 0
        members[shard].append(position)
        laid += costs[position]
    return [[combos[p] for p in sorted(positions)] for positions in members]


def shard_combos(combos: Sequence[Combo], index: int, count: int, cost: Callable[[Combo], float]) -> list[Combo]:
    """Shard `index` (from 1) of `count`."""
    return partition(combos, count, cost)[index - 1]


def select_shard(
    combos: Sequence[Combo], models: dict[str, ModelSource], options: RunOptions, spec: str
) -> list[Combo]:
    """The combinations of shard `spec` ("I/N"), costed from the models' checkpoints and the options."""
    index, count = parse_shard(spec)
    names = sorted({c.model for c in combos})
    sizes = {name: checkpoint_bytes(models[name]) for name in names}
    kinds = {name: materialize(models[name]).kind for name in names}
    return shard_combos(combos, index, count, lambda c: combo_cost(c, sizes[c.model], kinds[c.model], options))
