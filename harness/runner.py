"""Running a matrix: one isolated worker per combination, a record on disk after each.

The runner is shared by `harness run` and the pytest plugin. It owns the order of work (the
reference precision of each model and device first, so quality can be compared), the load
repeats, and the turning of worker results into records.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import RunOptions
from harness.environment import Environment, collect_environment
from harness.errors import one_line
from harness.launcher import Launcher, WorkerResult, measure_import_s
from harness.matrix import Capabilities, Combo, Selection, unsupported_reason
from harness.models import ModelSource, materialize, resolve_model
from harness.records import Record
from harness.storage import RunWriter
from harness.throughput import median_iqr
from harness.worker import WorkerJob

REFERENCE_ORDER = ("fp32", "bf16", "fp16")


@dataclass
class Plan:
    """A validated selection: models resolved, combinations expanded."""

    selection: Selection
    options: RunOptions
    models: dict[str, ModelSource]

    @classmethod
    def create(cls, selection: Selection, options: RunOptions) -> Plan:
        models = {
            name: resolve_model(name, options.allow_pickle, options.trust_remote_code) for name in selection.models
        }
        return cls(selection, options, models)

    def combos(self) -> list[Combo]:
        return self.selection.combos()


def reference_precision(combo: Combo, options: RunOptions, capabilities: Capabilities) -> str | None:
    """--reference, else the highest precision PyTorch runs on this device (fp32, bf16, fp16)."""
    candidates = (options.reference,) if options.reference else REFERENCE_ORDER
    for precision in candidates:
        reference = Combo(combo.model, "pytorch", precision, combo.device)
        if unsupported_reason(reference, capabilities) is None:
            return precision
    return None


def reference_first(combos: Iterable[Combo], options: RunOptions, capabilities: Capabilities) -> list[Combo]:
    """Each model and device's reference combination first, so quality never needs a second load."""
    combos = list(combos)
    groups = {}
    for combo in combos:
        groups.setdefault((combo.model, combo.device), len(groups))

    def key(item: tuple[int, Combo]) -> tuple[int, int]:
        index, combo = item
        is_ref = combo.framework == "pytorch" and combo.precision == reference_precision(combo, options, capabilities)
        return groups[(combo.model, combo.device)], 0 if is_ref else 1 + index

    return [c for _, c in sorted(enumerate(combos), key=key)]


def _outcome(combo: Combo, status: str, **fields: Any) -> Record:
    return Record(combo.model, combo.framework, combo.precision, combo.device, status, **fields)


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text)


@dataclass
class Runner:
    """Runs combinations of a Plan in isolated workers and writes their records."""

    plan: Plan
    writer: RunWriter
    env: Environment = field(default_factory=collect_environment)

    def __post_init__(self) -> None:
        self.capabilities = Capabilities.detect(self.env)
        self.launcher = Launcher(preload_bitsandbytes=not self.env.gpus)
        self._models: dict[str, ModelSource] = {}
        self._import_s: dict[str, float | None] = {}
        self._bandwidth: dict[str, float | None] = {}
        self._references: dict[tuple[str, str], tuple[str | None, str]] = {}

    # --- helpers ----------------------------------------------------------------------------

    def model(self, name: str) -> ModelSource:
        if name not in self._models:
            self._models[name] = materialize(self.plan.models[name])
        return self._models[name]

    def import_s(self, framework: str) -> float | None:
        if framework not in self._import_s:
            self._import_s[framework] = measure_import_s(framework)
        return self._import_s[framework]

    def reference_precision(self, combo: Combo) -> str | None:
        return reference_precision(combo, self.plan.options, self.capabilities)

    def _log_path(self, combo: Combo, suffix: str = "") -> str:
        return str(self.writer.logs_dir() / f"{_safe_name(combo.id)}{suffix}.log")

    def _job(self, combo: Combo, **kwargs: object) -> WorkerJob:
        options = self.plan.options
        return WorkerJob(combo=combo, model=self.model(combo.model), options=options, **kwargs)

    def bandwidth(self, device: str) -> float | None:
        """Device copy bandwidth, measured once per run in its own worker."""
        if device not in self._bandwidth:
            probe = Combo("bandwidth", "pytorch", "fp32", device)
            job = WorkerJob(combo=probe, model=ModelSource("bandwidth", "", None, None, True),
                            options=self.plan.options, mode="bandwidth", log_path=self._log_path(probe))  # fmt: skip
            result = self.launcher.run(job, self.plan.options.timeout_s)
            self._bandwidth[device] = result.fields.get("memory_bandwidth_bytes_s") if result.ok else None
        return self._bandwidth[device]

    def reference_paths(self, combo: Combo) -> tuple[str | None, str | None, str]:
        """(reference to read, reference to write, reason when there is none)."""
        precision = self.reference_precision(combo)
        if precision is None or not self.plan.options.quality:
            return None, None, "no precision on this device can serve as the reference"
        key = (combo.model, combo.device)
        path = str(self.writer.path / "reference" / f"{_safe_name(combo.model)}-{combo.device}-{precision}.npz")
        if Path(path).exists():
            return path, None, ""
        is_reference = combo.framework == "pytorch" and combo.precision == precision
        if is_reference:
            return path, path, ""
        if key not in self._references:
            reference = Combo(combo.model, "pytorch", precision, combo.device)
            job = self._job(reference, mode="full", write_reference_path=path,
                            log_path=self._log_path(reference, "-reference"))  # fmt: skip
            result = self.launcher.run(job, self.plan.options.timeout_s)
            self._references[key] = (path if result.ok else None, result.error or "")
        ready, error = self._references[key]
        return ready, None, f"reference {precision} failed: {error}"

    # --- one combination --------------------------------------------------------------------

    def run_combo(self, combo: Combo) -> Record:
        """Run one combination in isolated workers, append its record, and return it."""
        record = self._measure(combo)
        self.writer.append(record)
        return record

    def _measure(self, combo: Combo) -> Record:
        reason = unsupported_reason(combo, self.capabilities)
        if reason is not None:
            return _outcome(combo, "skipped", skip_reason=reason)
        options = self.plan.options
        try:
            model = self.model(combo.model)
        except Exception as exc:  # a zoo build that fails is this combination's failure
            return _outcome(combo, "failed", error_kind="error", error=one_line(exc))
        if combo.framework == "tensorflow":
            from harness.backends.keras_support import tensorflow_unsupported_reason

            reason = tensorflow_unsupported_reason(model.model_type, model.kind)
            if reason is not None:
                return _outcome(combo, "skipped", skip_reason=reason)
        read_ref, write_ref, ref_reason = (None, None, "")
        if options.quality:
            read_ref, write_ref, ref_reason = self.reference_paths(combo)
        bandwidth = self.bandwidth(combo.device) if options.throughput else None
        job = self._job(
            combo,
            mode="full",
            reference_path=read_ref,
            write_reference_path=write_ref,
            reference_note=ref_reason,
            memory_bandwidth_bytes_s=bandwidth,
            log_path=self._log_path(combo),
        )
        main = self.launcher.run(job, options.timeout_s)
        extra = [
            self.launcher.run(self._job(combo, mode="load", log_path=self._log_path(combo)), options.timeout_s)
            for _ in range(options.repeats - 1)
        ] if main.ok else []  # fmt: skip
        record = self._to_record(combo, model, main, extra)
        record.import_s = self.import_s(combo.framework)
        if read_ref is not None:
            record.reference_precision = self.reference_precision(combo)
        return record

    @staticmethod
    def _to_record(combo: Combo, model: ModelSource, main: WorkerResult, extra: list[WorkerResult]) -> Record:
        if not main.ok:
            return _outcome(combo, "failed", error_kind=main.error_kind, error=main.error,
                            model_source=model.source, model_kind=model.kind, worker_wall_s=main.wall_s)  # fmt: skip
        fields = dict(main.fields)
        reasons = fields.pop("na_reasons", {})
        samples = [main.fields["load_s"]] + [r.fields["load_s"] for r in extra if r.ok]
        failed = [r for r in extra if not r.ok]
        if failed:
            reasons["load_s_samples"] = f"{len(failed)} repeat(s) failed: {failed[0].error}"
        load_s, load_iqr = median_iqr(samples)
        fields.update(load_s=load_s, load_s_iqr=load_iqr, load_s_samples=samples)
        if "load_bandwidth_bytes_s" in fields and fields.get("checkpoint_bytes"):
            fields["load_bandwidth_bytes_s"] = fields["checkpoint_bytes"] / load_s
        record = _outcome(combo, "ok", model_source=model.source, worker_wall_s=main.wall_s,
                          worker_start_s=main.start_s, na_reasons=reasons)  # fmt: skip
        for name, value in fields.items():
            if name not in Record.__dataclass_fields__:
                raise KeyError(f"worker returned unknown field {name!r}")
            setattr(record, name, value)
        if record.model_kind is None:
            record.model_kind = model.kind
        if not record.device.startswith("cuda"):
            for name in ("peak_device_allocated_bytes", "peak_device_reserved_bytes", "device_process_bytes"):
                record.na_reasons[name] = "host device: no separate device memory"
        elif record.framework == "tensorflow" and record.peak_device_reserved_bytes is None:
            record.na_reasons["peak_device_reserved_bytes"] = "TensorFlow does not report its allocator's reserved pool"
        return record

    # --- the whole matrix -------------------------------------------------------------------

    def run(self, combos: Iterable[Combo], on_record: Callable[[Record], None] | None = None) -> list[Record]:
        records = []
        for combo in reference_first(combos, self.plan.options, self.capabilities):
            record = self.run_combo(combo)
            records.append(record)
            if on_record:
                on_record(record)
        return records
