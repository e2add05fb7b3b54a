"""The finetune scenario: can this model be fine-tuned here, at this precision, and at what cost?

In one isolated worker: load (timed, as in the inference scenario, but without the eval-mode first
forward, which on AVX512-BF16 CPUs repacks bitsandbytes' 4-bit weights into an inference-only
layout), attach a LoRA adapter the way the registry's `Precision.lora` says (QLoRA for
bitsandbytes), then run `train_steps` optimizer steps on one fixed batch cut from the evaluation
text. Each step is three phases, each synchronized, timed and metered (peak RSS, allocator peak,
contention): forward (with the loss), backward, optimizer step. The first step is the warm-up:
its time is kept apart, its memory counts. A row that does not learn (last loss not below the
first) or whose gradients never reach the adapter fails with that reason.

A second worker (mode "adapter") loads a fresh base at the same precision, attaches the saved
adapter and compares its logits with the trained model's (KL); then merges the adapter into the
weights where peft can and compares again.

What the parent needs about training lives elsewhere, so that it imports no measuring module: what
can be trained and why not in harness.registry (lora_method, training_skip_reason), the scenario's
record fields in harness.records (training_fields). TrainSettings here imports no framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from harness.records import TRAIN_PHASES

TRAINED_LOGITS_FILE = "trained_logits.npy"
TRAIN_IDS_FILE = "train_ids.npy"
NO_GRADIENT_REASON = (
    "no gradient reached the trainable parameters: every one is None or zero after the first backward "
    "(gradient checkpointing with use_reentrant=True and no input that requires grad leaves LoRA gradients None)"
)


@dataclass(frozen=True)
class TrainSettings:
    """How one combination is trained (from RunOptions and the precision's registry entry)."""

    method: str  # plain | kbit | full
    rank: int
    alpha: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    gradient_checkpointing: bool
    optimizer: str

    @classmethod
    def from_options(cls, options: Any, precision: str) -> TrainSettings:
        from harness.registry import lora_method

        method, reason = lora_method(precision, options.lora_rank)
        if method is None:
            raise ValueError(reason)
        return cls(method, options.lora_rank, options.effective_lora_alpha, options.seq_len,
                   options.train_batch_size, options.train_steps, options.learning_rate,
                   options.gradient_checkpointing, options.optimizer)  # fmt: skip

    def fields(self) -> dict[str, Any]:
        """The settings as record fields."""
        return {"lora_method": self.method, "lora_rank": self.rank, "train_seq_len": self.seq_len,
                "train_batch_size": self.batch_size, "train_steps": self.steps, "learning_rate": self.learning_rate,
                "optimizer": self.optimizer}  # fmt: skip


@dataclass(frozen=True)
class TrainSetup:
    """What attaching the adapter produced."""

    trainable_params: int  # peft's count
    all_params: int  # peft's count (packed 4-bit weights per element)
    trainable_param_bytes: int
    upcast_param_bytes: int  # bytes the kbit preparation added by casting 16-bit parameters to fp32
    lora_alpha: int | None  # the scaling numerator the framework really uses (None for full fine-tuning)
    lora_targets: str  # which layers got adapters
    gradient_checkpointing: bool  # as it ran (a framework without it trains without)


class Trainer(Protocol):
    """What a framework's trainer (the registry's `Framework.trainer`) provides to this scenario."""

    def __init__(self, backend: Any, settings: TrainSettings) -> None: ...

    def attach(self) -> TrainSetup: ...

    def forward(self, input_ids: np.ndarray) -> float:
        """The training forward with labels = inputs; returns the loss."""

    def backward(self) -> None: ...

    def gradients_nonzero(self) -> list[bool]:
        """Per trainable tensor: has a gradient that is not all zeros (read between backward and step)."""

    def step(self) -> None:
        """Optimizer step, then clear the gradients."""

    def optimizer_state_bytes(self) -> int: ...

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Eval-mode float32 logits [tokens, vocab] of one sequence."""

    def save(self, directory: Path) -> int:
        """Save the adapter (full fine-tuning: the model); bytes written."""

    def reload(self, directory: Path) -> None:
        """Load a fresh base through the backend and attach the saved adapter (full fine-tuning: load
        the saved model itself), for inference."""

    def merge(self) -> None:
        """Fold the adapter into the weights; NotImplementedError (or the library's error) where impossible."""


# --- worker side --------------------------------------------------------------------------------


def unique_storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the storages behind `tensors`, each storage once (tied or shared tensors)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def train_batch(eval_ids: np.ndarray, seq_len: int, batch_size: int) -> np.ndarray:
    """The fixed training batch [batch, seq_len]: consecutive windows of the evaluation text."""
    from harness.measure.throughput import prompt_batch

    return prompt_batch(eval_ids, seq_len, batch_size)


class TrainingFailed(RuntimeError):
    """A training row that ran but must not count as ok (did not learn, no gradients, NaN loss)."""


def _median_summary(samples: list[float]) -> tuple[float, float, float | None]:
    from harness.stats import ci_rel_or_none, median_iqr

    median, iqr = median_iqr(samples)
    return median, iqr, ci_rel_or_none(samples)


def run_steps(
    trainer: Trainer,
    backend: Any,
    ids: np.ndarray,
    steps: int,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[list[float], dict[str, list[float]], list[Any], float]:
    """`steps` optimizer steps on `ids`, each phase synchronized, timed and metered.

    Returns (losses, seconds per phase per step, phase results, share of trainable tensors that got
    a non-zero gradient in some step). Raises TrainingFailed on a non-finite loss or when the first
    backward leaves every gradient None or zero; any error (an out-of-memory, say) leaves with a
    note naming the phase and step it happened in. `on_phase(name)` hears each phase as it starts.
    """
    from harness.measure.trackers import PhaseMeter, Timer

    losses: list[float] = []
    seconds: dict[str, list[float]] = {name: [] for name in TRAIN_PHASES}
    results: list[Any] = []
    reached: list[bool] | None = None
    actions: dict[str, Callable[[], Any]] = {
        "train_forward": lambda: losses.append(trainer.forward(ids)),
        "train_backward": trainer.backward,
        "train_optimizer": trainer.step,
    }
    for step in range(steps):
        for name in TRAIN_PHASES:
            if name == "train_optimizer":  # between backward and step: the gradients exist now
                flags = trainer.gradients_nonzero()
                if not flags:
                    raise TrainingFailed("the trainer left no trainable parameter: nothing to train")
                if step == 0 and not any(flags):
                    raise TrainingFailed(NO_GRADIENT_REASON)
                reached = flags if reached is None else [a or b for a, b in zip(reached, flags, strict=True)]
            if on_phase is not None:
                on_phase(f"{name} (step {step + 1})")
            try:
                with PhaseMeter(name, backend, timed=True) as meter:
                    with Timer(backend.synchronize) as timer:
                        actions[name]()
            except Exception as exc:
                exc.add_note(f"in the {name} phase of step {step + 1}")
                raise
            results.append(meter.result)
            seconds[name].append(timer.elapsed_s)
        if not np.isfinite(losses[-1]):
            raise TrainingFailed(f"the training loss is not finite at step {step + 1}: {losses[-1]}")
    return losses, seconds, results, float(np.mean(reached)) if reached else 0.0


def finetune_fields(
    backend: Any, job: Any, eval_ids: np.ndarray, on_phase: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Worker mode "finetune": load, attach, train, save the adapter and the trained logits."""
    from harness.measure.inference import measure_load, phase_fields
    from harness.registry import FRAMEWORKS, load_object

    settings = TrainSettings.from_options(job.options, job.combo.precision)
    trainer_class = load_object(FRAMEWORKS[job.combo.framework].trainer)  # its imports (peft) before the baseline
    notify = on_phase or (lambda name: None)
    notify("load")
    fields = measure_load(backend, backend.spec.kind, eval_ids, first_forward=False)
    phases = fields.pop("_phases")
    reasons: dict[str, str] = fields.pop("na_reasons", {})
    trainer = trainer_class(backend, settings)
    notify("attach")
    setup = trainer.attach()
    ids = train_batch(eval_ids, settings.seq_len, settings.batch_size)
    losses, seconds, results, reached = run_steps(trainer, backend, ids, settings.steps, notify)
    notify("adapter save")
    if not losses[-1] < losses[0]:
        raise TrainingFailed(
            f"did not learn: the loss went {losses[0]:.4g} -> {losses[-1]:.4g} over {settings.steps} steps "
            f"on one fixed batch (learning rate {settings.learning_rate:g})"
        )
    step_s = [sum(seconds[name][i] for name in TRAIN_PHASES) for i in range(settings.steps)]
    timed = step_s[1:]  # the first step is the warm-up
    tokens = settings.seq_len * settings.batch_size
    step_median, step_iqr, step_ci = _median_summary(timed)
    fields.update(settings.fields())
    fields.update(
        trainable_params=setup.trainable_params,
        all_params=setup.all_params,
        trainable_param_bytes=setup.trainable_param_bytes,
        upcast_param_bytes=setup.upcast_param_bytes,
        lora_alpha=setup.lora_alpha,
        lora_targets=setup.lora_targets,
        gradient_checkpointing=setup.gradient_checkpointing,
        optimizer_state_bytes=trainer.optimizer_state_bytes(),
        train_step_s=step_median,
        train_step_s_samples=timed,
        train_step_s_iqr=step_iqr,
        train_step_s_ci_rel=step_ci,
        train_first_step_s=step_s[0],
        train_tok_s=_median_summary([tokens / s for s in timed])[0],
        train_tok_s_samples=[tokens / s for s in timed],
        train_losses=losses,
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_drop_frac=(losses[0] - losses[-1]) / losses[0] if losses[0] else None,
        grad_nonzero_frac=reached,
        **{f"train_{name}_s": float(np.median(seconds[f"train_{name}"][1:])) for name in ("forward", "backward", "optimizer")},
    )  # fmt: skip
    if step_ci is None:
        reasons["train_step_s_ci_rel"] = "a single timed step: no CI"
    if setup.lora_alpha is None:
        reasons["lora_alpha"] = "full fine-tuning: no adapter to scale"
    reserved = [r.device_reserved_peak_bytes for r in results if r.device_reserved_peak_bytes is not None]
    fields["peak_device_reserved_train_bytes"] = max(reserved) if reserved else None
    if not reserved:
        reasons["peak_device_reserved_train_bytes"] = (
            "cpu: the host is the device; see peak_rss_train_*" if backend.spec.device == "cpu"
            else "the device's allocator reports no reserved pool"
        )  # fmt: skip
    fields.update(phase_fields([*phases, *results], backend.spec.device, reasons))
    fields.update(train_peak_fields(fields, backend.spec.device))
    directory = Path(job.adapter_dir)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / TRAIN_IDS_FILE, ids[0])
    np.save(directory / TRAINED_LOGITS_FILE, trainer.logits(ids[0]))
    fields["adapter_bytes"] = trainer.save(directory)
    fields["na_reasons"] = reasons
    return fields


def train_peak_fields(fields: dict[str, Any], device: str) -> dict[str, Any]:
    """The largest training phase's peak: allocator bytes on a GPU, else host RSS above the pre-load baseline."""
    if device != "cpu":
        peaks = {p: fields.get(f"peak_device_allocated_{p}_bytes") for p in TRAIN_PHASES}
        baseline = 0
    else:
        peaks = {p: fields.get(f"peak_rss_{p}_bytes") for p in TRAIN_PHASES}
        baseline = fields["rss_before_load_bytes"]
    known = {p: v for p, v in peaks.items() if v is not None}
    if not known:
        return {"train_peak_bytes": None, "train_peak_phase": None}
    phase = max(known, key=lambda p: known[p])
    return {"train_peak_bytes": known[phase] - baseline, "train_peak_phase": phase}


def adapter_fields(backend: Any, job: Any) -> dict[str, Any]:
    """Worker mode "adapter": a fresh base at the same precision plus the saved adapter (full fine-tuning:
    the saved model itself), compared with the trained model's logits; then merged, where peft can."""
    from harness.registry import FRAMEWORKS, load_object

    settings = TrainSettings.from_options(job.options, job.combo.precision)
    directory = Path(job.adapter_dir)
    ids = np.load(directory / TRAIN_IDS_FILE)
    trained = np.load(directory / TRAINED_LOGITS_FILE)
    trainer_class = load_object(FRAMEWORKS[job.combo.framework].trainer)

    def fresh_trainer() -> Trainer:
        backend.model = None  # the previous base, if any, goes before the next loads
        trainer = trainer_class(backend, settings)
        trainer.reload(directory)
        return trainer

    backend.prepare()
    fields: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    kl, diff = logits_kl(trained, fresh_trainer().logits(ids))
    fields.update(adapter_roundtrip_kl=kl, adapter_roundtrip_max_abs_diff=diff)
    if settings.method == "full":
        fields.update(merged_kl=None, merged_max_abs_diff=None)
        reasons["merged_kl"] = reasons["merged_max_abs_diff"] = "full fine-tuning: no adapter to merge"
        return fields | {"na_reasons": reasons}
    # Merged on a base that has run no forward: on AVX512-BF16 CPUs an eval-mode forward repacks
    # bitsandbytes' 4-bit weights, and merging after it dequantizes them in the wrong layout (KNOWN_ISSUES).
    trainer = fresh_trainer()
    try:
        trainer.merge()
    except Exception as exc:  # peft raises ValueError/NotImplementedError/TypeError for layers it cannot merge
        from harness.errors import one_line

        fields.update(merged_kl=None, merged_max_abs_diff=None)
        reasons["merged_kl"] = reasons["merged_max_abs_diff"] = f"cannot merge here: {one_line(exc)}"
        return fields | {"na_reasons": reasons}
    kl, diff = logits_kl(trained, trainer.logits(ids))
    return fields | {"merged_kl": kl, "merged_max_abs_diff": diff, "na_reasons": reasons}


def logits_kl(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(mean per-token KL(reference || candidate) in nats, max |logit difference|), in float64."""
    from harness.measure.quality import _log_softmax

    ref_lp, cand_lp = _log_softmax(reference), _log_softmax(candidate)
    kl = np.maximum((np.exp(ref_lp) * (ref_lp - cand_lp)).sum(axis=-1), 0.0)
    return float(kl.mean()), float(np.abs(reference.astype(np.float64) - candidate).max())
