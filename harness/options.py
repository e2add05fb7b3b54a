"""Run options: a dataclass validated on creation, shared by the CLI, the pytest plugin and workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.registry import DEFAULT_FRAMEWORKS, DEFAULT_PRECISIONS, FRAMEWORKS, PRECISIONS

SCENARIOS = ("inference", "finetune")
OPTIMIZERS = ("adamw", "adamw8bit")
FLAG = "flag"  # the field metadata key that makes a RunOptions field a command-line option


@dataclass(frozen=True)
class Flag:
    """How one RunOptions field is given on a command line, for `harness run`, `harness plan` and the
    pytest plugin alike. Its default is the field's default, stated nowhere else.

    kind: value (typed as the field), ints (comma list), bytes (512M, 2GiB), set_true / set_false (a
    switch), on_off (choices on and off)."""

    flag: str
    help: str
    kind: str = "value"
    choices: tuple[str, ...] = ()
    plan: bool = False  # `harness plan` reads it too (sizes, memory, the fine-tuning settings)
    pytest_flag: str | None = None  # under pytest, where the name is a common plugin's (pytest-timeout)


def option(default: Any, flag: str, help: str, **how: Any) -> Any:
    """A RunOptions field with its command-line flag: `field(default=..., metadata={FLAG: Flag(...)})`."""
    return field(default=default, metadata={FLAG: Flag(flag, help, **how)})


@dataclass(frozen=True)
class RunOptions:
    """How each combination is measured. Defaults keep the default matrix within minutes on 2 cores."""

    repeats: int = option(3, "--repeats", "fresh-worker loads behind load_s")
    timeout_s: float = option(600.0, "--timeout", "seconds per worker", pytest_flag="--worker-timeout")
    memory_limit_bytes: int | None = option(
        None, "--memory-limit", "per worker, e.g. 4G: a failed `oom` record once its resident memory (VmRSS) grows"
        " this much past its baseline at start; on CUDA also the allocator's cap", kind="bytes",
    )  # fmt: skip
    preflight: bool = option(True, "--no-preflight", "run combinations the memory plan says do not fit",
                             kind="set_false")  # fmt: skip
    available_memory_bytes: int | None = option(
        None,
        "--available-memory",
        "device memory to plan against instead of what is free, e.g. 8GiB",
        kind="bytes",
        plan=True,
    )
    tokenizer: str | None = option(None, "--tokenizer", "tokenizer dir or hub id, for checkpoints that ship none")
    model_tokenizers: tuple[tuple[str, str], ...] = ()  # per model (matrix file [models.NAME] tokenizer)
    allow_pickle: bool = option(False, "--allow-pickle", "allow pickle (.bin) checkpoints", kind="set_true")
    trust_remote_code: bool = option(
        False, "--trust-remote-code", "allow a checkpoint's own Python code", kind="set_true"
    )
    throughput: bool = option(True, "--no-throughput", "skip prefill/decode/encode timing", kind="set_false")
    quality: bool = option(True, "--no-quality", "skip the comparison with the reference", kind="set_false")
    roundtrip: bool = option(False, "--roundtrip", "check a save/load round trip", kind="set_true")
    prompt_lengths: tuple[int, ...] = option((128,), "--prompt-lengths", "comma list; the KV cache plan uses the largest",
                                             kind="ints", plan=True)  # fmt: skip
    batch_sizes: tuple[int, ...] = option(
        (1,), "--batch-sizes", "comma list; the finetune scenario trains at the first", kind="ints", plan=True
    )
    new_tokens: int = option(64, "--new-tokens", "decode length", plan=True)
    # at least this many timed repeats for prefill/decode/encode (more until the CI target), after warm-up
    timing_repeats: int = option(3, "--timing-repeats", "at least this many timed repeats after warm-up")
    min_timing_s: float = 0.5  # repeats are extended until they add up to this much
    warmup: int = 1
    time_budget_s: float = option(2.0, "--time-budget", "seconds per timed phase before repeats stop")
    target_ci_rel: float = option(
        0.05, "--ci-target", "stop repeating once the median's 95%% CI half-width is within this share"
    )
    cold: bool = option(
        True, "--no-cold", "skip the cold-load worker (raw read + a load after a page-cache drop)", kind="set_false"
    )
    eval_text: Path | None = option(None, "--eval-text", "UTF-8 text for quality (default: shipped text)")
    eval_tokens: int = option(2048, "--eval-tokens", "quality token budget")
    greedy_prompts: int = 4
    greedy_tokens: int = 16
    reference: str | None = option(
        None, "--reference", "precision quality is measured against (default fp32, else bf16)"
    )
    reference_model: str | None = option(
        None, "--reference-model", "full-precision model that pre-quantized (as-saved) checkpoints are compared with"
    )
    model_references: tuple[tuple[str, str], ...] = ()  # per model (matrix file [models.NAME] reference_model)
    # --- the finetune scenario (harness.measure.finetune): one LoRA/QLoRA training run per combination ---
    scenario: str = option(
        "inference", "--scenario", "inference: load, speed, memory, quality; finetune: a LoRA/QLoRA training run per"
        " combination (under pytest: only the fine-tuning suite, like -m finetune)", choices=SCENARIOS,
    )  # fmt: skip
    seq_len: int = option(256, "--seq-len", "tokens per training sequence", plan=True)
    lora_rank: int = option(8, "--lora-rank", "LoRA rank; 0 = full fine-tuning", plan=True)
    lora_alpha: int | None = option(None, "--lora-alpha", "LoRA alpha (default 2 x rank)", plan=True)
    train_steps: int = option(6, "--train-steps", "optimizer steps on one fixed batch; the first is the warm-up",
                              plan=True)  # fmt: skip
    learning_rate: float = option(1e-3, "--learning-rate", "AdamW learning rate", plan=True)
    gradient_checkpointing: bool = option(
        True, "--gradient-checkpointing", "recompute activations in backward", kind="on_off", plan=True
    )
    optimizer: str = option(
        "adamw", "--optimizer", "adamw (torch) or adamw8bit (bitsandbytes' 8-bit states)", choices=OPTIMIZERS,
        plan=True,
    )  # fmt: skip

    def tokenizer_for(self, model: str) -> str | None:
        """The tokenizer given for `model` (matrix file per model, else --tokenizer), or None."""
        return dict(self.model_tokenizers).get(model, self.tokenizer)

    @property
    def train_batch_size(self) -> int:
        """The finetune scenario's batch: the first --batch-sizes value."""
        return self.batch_sizes[0]

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def reference_model_for(self, model: str) -> str | None:
        """The full-precision reference model given for `model` (matrix file, else --reference-model)."""
        return dict(self.model_references).get(model, self.reference_model)

    def __post_init__(self) -> None:
        positive = {
            "repeats": self.repeats,
            "timeout": self.timeout_s,
            "new-tokens": self.new_tokens,
            "timing-repeats": self.timing_repeats,
            "eval-tokens": self.eval_tokens,
            "seq-len": self.seq_len,
            "train-steps": self.train_steps,
            "learning-rate": self.learning_rate,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UsageError(f"--{name} must be positive, got {value}")
        for name, values in (("prompt-lengths", self.prompt_lengths), ("batch-sizes", self.batch_sizes)):
            if not values or any(v <= 0 for v in values):
                raise UsageError(f"--{name} needs positive integers, got {list(values)}")
        if self.time_budget_s <= 0 or not 0 < self.target_ci_rel < 1:
            raise UsageError("--time-budget must be positive and --ci-target between 0 and 1")
        if self.min_timing_s < 0 or self.warmup < 0:
            raise UsageError("--min-timing and --warmup cannot be negative")
        for name, value in (
            ("memory-limit", self.memory_limit_bytes),
            ("available-memory", self.available_memory_bytes),
        ):
            if value is not None and value <= 0:
                raise UsageError(f"--{name} must be positive")
        if self.scenario not in SCENARIOS:
            raise UsageError(f"unknown --scenario '{self.scenario}': use one of {', '.join(SCENARIOS)}")
        if self.lora_rank < 0 or (self.lora_alpha is not None and self.lora_alpha <= 0):
            raise UsageError("--lora-rank cannot be negative (0 is full fine-tuning) and --lora-alpha must be positive")
        if self.train_steps < 2:
            raise UsageError(
                f"--train-steps must be at least 2 (a warm-up step and a timed one), got {self.train_steps}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown --optimizer '{self.optimizer}': use one of {', '.join(OPTIMIZERS)}")
        if self.eval_text is not None and not Path(self.eval_text).is_file():
            raise UsageError(f"--eval-text {self.eval_text}: no such file; give a UTF-8 text file")
        if self.reference is not None and self.reference not in PRECISIONS:
            raise UsageError(f"unknown --reference '{self.reference}': use one of {', '.join(PRECISIONS)}")


def option_fields(plan_only: bool = False) -> Iterator[tuple[str, Any, Flag]]:
    """(field name, default, Flag) of every RunOptions field given on a command line."""
    for f in fields(RunOptions):
        flag = f.metadata.get(FLAG)
        if flag is not None and (flag.plan or not plan_only):
            yield f.name, f.default, flag


def _default_note(default: Any, flag: Flag) -> str:
    if flag.kind in ("set_true", "set_false") or default is None:  # None: the help says what stands in
        return ""
    if flag.kind == "on_off":
        return " (default on)" if default else " (default off)"
    shown = (
        ",".join(map(str, default))
        if isinstance(default, tuple)
        else f"{default:g}"
        if isinstance(default, float)
        else default
    )
    return f" (default {shown})"


def add_run_options(add_option: Callable[..., Any], plan_only: bool = False, pytest: bool = False) -> None:
    """Declare RunOptions' flags through `add_option`: argparse's add_argument or pytest's addoption.
    Every flag defaults to None ("not given"), so the field's own default, a matrix file or pytest's
    suite settings apply underneath (see given_options)."""
    types = {"int": int, "float": float, "str": str, "Path": Path}
    annotations = {f.name: str(f.type).removesuffix(" | None") for f in fields(RunOptions)}
    for name, default, flag in option_fields(plan_only):
        how: dict[str, Any] = {"dest": name, "default": None, "help": flag.help + _default_note(default, flag)}
        if flag.kind in ("set_true", "set_false"):
            how |= {"action": "store_const", "const": flag.kind == "set_true"}
        elif flag.kind == "on_off":
            how["choices"] = ("on", "off")
        elif not flag.choices:
            how["metavar"] = flag.flag.removeprefix("--").upper().replace("-", "_")
        if flag.kind == "value":
            how["type"] = types[annotations[name]]
            if flag.choices:
                how["choices"] = flag.choices
        add_option((flag.pytest_flag or flag.flag) if pytest else flag.flag, **how)


def given_options(value_of: Callable[[str], Any], plan_only: bool = False) -> dict[str, Any]:
    """RunOptions keywords for the flags given on a command line; `value_of(dest)` reads one (None: not
    given), e.g. `vars(args).get` or pytest's `config.getoption`."""
    given: dict[str, Any] = {}
    for name, _, flag in option_fields(plan_only):
        value = value_of(name)
        if value is None:
            continue
        if flag.kind == "ints":
            value = parse_int_list(flag.flag.removeprefix("--"), value)
        elif flag.kind == "bytes":
            value = parse_bytes(value)
        elif flag.kind == "on_off":
            value = value == "on"
        given[name] = value
    return given


# The matrix axes and where a run goes, shared by `harness run` and the pytest plugin (flag, help).
SELECTION_FLAGS: tuple[tuple[str, str], ...] = (
    ("--models", "comma list: zoo names, checkpoint dirs or hub ids (default: the zoo)"),
    ("--frameworks", "comma list of {frameworks} (default: {default_frameworks})"),
    ("--precisions", "comma list of {precisions} (default: {default_precisions}; `harness precisions` lists them)"),
    ("--devices", "comma list of cpu, cuda, cuda:N, xla (default: cpu + cuda if present)"),
)
MATRIX_FLAG = ("--matrix", "TOML matrix file: axes, [options], per-model axes (and budgets and tolerances that the"
               " suites check); flags given here override it")  # fmt: skip
SHARD_FLAG = ("--shard", "run only shard I of N of the matrix (the same split on every machine, balanced by predicted"
              " time: checkpoint size, loads and generated tokens)")  # fmt: skip
RUN_ID_FLAG = ("--run-id", "name of this run's dir (default: UTC timestamp)")


def add_selection_options(add_option: Callable[..., Any], axes_only: bool = False) -> None:
    """--models, --frameworks, --precisions, --devices; then --matrix, --shard and --run-id."""
    names = {
        "frameworks": ", ".join(FRAMEWORKS),
        "default_frameworks": ",".join(DEFAULT_FRAMEWORKS),
        "precisions": ", ".join(PRECISIONS),
        "default_precisions": ",".join(DEFAULT_PRECISIONS),
    }
    for flag, text in SELECTION_FLAGS:
        add_option(flag, help=text.format(**names))
    if axes_only:
        return
    add_option(MATRIX_FLAG[0], type=Path, help=MATRIX_FLAG[1])
    add_option(SHARD_FLAG[0], metavar="I/N", help=SHARD_FLAG[1])
    add_option(RUN_ID_FLAG[0], help=RUN_ID_FLAG[1])


def parse_int_list(name: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--{name} takes integers separated by commas, e.g. 128,512") from None


def parse_bytes(value: str) -> int:
    """`512M`, `2G`, `1000000` -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise UsageError(f"cannot read '{value}' as a size: use bytes or a suffix, e.g. 512M or 2G") from None
