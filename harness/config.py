"""Run options: a dataclass validated on creation, shared by the CLI, the pytest plugin and workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError

SCENARIOS = ("inference", "finetune")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class RunOptions:
    """How each combination is measured. Defaults keep the default matrix within minutes on 2 cores."""

    repeats: int = 3  # fresh-worker loads behind load_s
    timeout_s: float = 600.0  # per worker
    memory_limit_bytes: int | None = None  # per worker: resident host memory beyond its baseline; CUDA allocator cap
    preflight: bool = True  # skip combinations whose memory plan does not fit before any worker loads them
    available_memory_bytes: int | None = None  # overrides the device's free memory in the pre-flight fit
    tokenizer: str | None = None  # tokenizer dir or hub id for every model (--tokenizer)
    model_tokenizers: tuple[tuple[str, str], ...] = ()  # per model (matrix file [models.NAME] tokenizer)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    throughput: bool = True
    quality: bool = True
    roundtrip: bool = False  # save_pretrained -> from_pretrained and compare outputs
    prompt_lengths: tuple[int, ...] = (128,)
    batch_sizes: tuple[int, ...] = (1,)
    new_tokens: int = 64
    timing_repeats: int = (
        3  # at least this many timed repeats for prefill/decode/encode (more until the CI target), after warm-up
    )
    min_timing_s: float = 0.5  # repeats are extended until they add up to this much
    warmup: int = 1
    time_budget_s: float = 2.0  # per timed phase (load repeats, prefill, decode, encode): stop repeating past it
    target_ci_rel: float = 0.05  # stop repeating once the median's 95 % CI half-width is below this share
    cold: bool = True  # one extra worker per combination: raw cold read + a load after dropping the page cache
    eval_text: Path | None = None
    eval_tokens: int = 2048
    greedy_prompts: int = 4
    greedy_tokens: int = 16
    reference: str | None = None  # precision that quality is measured against
    reference_model: str | None = None  # full-precision model a pre-quantized (as-saved) one is compared with
    model_references: tuple[tuple[str, str], ...] = ()  # per model (matrix file [models.NAME] reference_model)
    # --- the finetune scenario (harness.finetune): one LoRA/QLoRA training run per combination ---
    scenario: str = "inference"  # inference | finetune
    seq_len: int = 256  # tokens per training sequence (batch size: the first of batch_sizes)
    lora_rank: int = 8  # 0: full fine-tuning (float precisions only), the reference row
    lora_alpha: int | None = None  # default 2 x rank
    train_steps: int = 6  # optimizer steps on one fixed batch; the first is the warm-up, untimed
    learning_rate: float = 1e-3
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"  # adamw (torch) | adamw8bit (bitsandbytes' 8-bit states)

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
        if self.reference is not None:
            from harness.registry import PRECISIONS

            if self.reference not in PRECISIONS:
                raise UsageError(f"unknown --reference '{self.reference}': use one of {', '.join(PRECISIONS)}")


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
