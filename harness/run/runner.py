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

from harness.environment import Environment, collect_environment
from harness.errors import one_line
from harness.options import RunOptions, given_options
from harness.plan.matrix import Capabilities, Combo, Selection, unsupported_reason
from harness.plan.matrixfile import MatrixFile, load_matrix_file, matrix_axes
from harness.plan.models import ModelSource, materialize, resolve_model
from harness.records import TRAIN_PHASES, Record
from harness.registry import FRAMEWORKS, PRECISIONS, REFERENCE_FRAMEWORK, REFERENCE_ORDER, quantizer_preload
from harness.run.launcher import Launcher, WorkerResult, measure_import_s
from harness.run.reasons import explain_nulls, skip_reason
from harness.run.worker import COLD_FIELDS, WorkerJob
from harness.stats import MIN_SAMPLES, RepeatPolicy, ci_rel_or_none, load_residency_fields, median_iqr, stop_reason
from harness.storage import RunWriter


@dataclass
class Plan:
    """A validated selection: models resolved, combinations expanded."""

    selection: Selection
    options: RunOptions
    models: dict[str, ModelSource]
    matrix_file: MatrixFile | None = None  # its per-model axes narrow the combinations

    @classmethod
    def create(cls, selection: Selection, options: RunOptions, matrix_file: MatrixFile | None = None) -> Plan:
        names = list(selection.models)
        names += [r for r in (options.reference_model_for(m) for m in selection.models) if r and r not in names]
        models = {
            name: resolve_model(name, options.allow_pickle, options.trust_remote_code, options.tokenizer_for(name))
            for name in names
        }
        return cls(selection, options, models, matrix_file)

    @classmethod
    def from_flags(
        cls, value_of: Callable[[str], Any], capabilities: Capabilities, settings: dict[str, Any] | None = None
    ) -> Plan:
        """The plan a command line asks for (`harness run` and the pytest plugin alike): `settings` (the
        suites' own), under the --matrix file's [options], under the flags given; the axes as given, else
        the matrix file's. `value_of(dest)` reads one flag (None: not given)."""
        path = value_of("matrix")
        matrix_file = load_matrix_file(Path(path)) if path else None
        layers = (settings or {}) | (matrix_file.options if matrix_file else {}) | given_options(value_of)
        selection = Selection.from_lists(*matrix_axes(value_of, matrix_file), capabilities)
        return cls.create(selection, RunOptions(**layers), matrix_file)

    def combos(self) -> list[Combo]:
        """The selection's combinations that the matrix file (if any) admits."""
        return [c for c in self.selection.combos() if self.matrix_file is None or self.matrix_file.admits(c)]


def reference_precision(combo: Combo, options: RunOptions, capabilities: Capabilities) -> str | None:
    """--reference, else the first of the registry's reference precisions (fp32, bf16, fp16) that the
    reference framework (PyTorch) runs on this device."""
    candidates = (options.reference,) if options.reference else REFERENCE_ORDER
    for precision in candidates:
        reference = Combo(combo.model, REFERENCE_FRAMEWORK, precision, combo.device)
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
        is_ref = combo.framework == REFERENCE_FRAMEWORK and combo.precision == reference_precision(
            combo, options, capabilities
        )
        return groups[(combo.model, combo.device)], 0 if is_ref else 1 + index

    return [c for _, c in sorted(enumerate(combos), key=key)]


def _outcome(combo: Combo, status: str, **fields: Any) -> Record:
    family = PRECISIONS[combo.precision].family
    return Record(combo.model, combo.framework, combo.precision, combo.device, status, family=family, **fields)


def _add_predicted(record: Record, predicted: dict[str, int | None], plan_note: str) -> None:
    """The plan's predicted fields; a missing one gets the plan's note as its reason."""
    for name, value in predicted.items():
        setattr(record, name, value)
        if value is None:
            record.na_reasons[name] = plan_note


def _load_fields(main: WorkerResult, extra: list[WorkerResult], reasons: dict[str, str]) -> dict[str, Any]:
    """load_s over the main worker's load and the repeats' (median, IQR, CI, samples), their page-cache
    residency, and contention seen during any of them."""
    fields = main.fields
    samples = [fields["load_s"]] + [r.fields["load_s"] for r in extra if r.ok]
    failed = [r for r in extra if not r.ok]
    if failed:
        reasons["load_s_samples"] = f"{len(failed)} repeat(s) failed: {failed[0].error}"
    load_s, load_iqr = median_iqr(samples)
    out: dict[str, Any] = dict(load_s=load_s, load_s_iqr=load_iqr, load_s_samples=samples,
                               load_s_ci_rel=ci_rel_or_none(samples))  # fmt: skip
    out.update(load_residency_fields([fields] + [r.fields for r in extra if r.ok], reasons))
    reasons.pop("load_s_ci_rel", None)
    if out["load_s_ci_rel"] is None:
        reasons["load_s_ci_rel"] = "a single load: no CI"
    contended_repeats = [r for r in extra if r.ok and r.fields.get("contended")]
    if contended_repeats and not fields.get("contended"):
        out["contended"] = True
        out["contention"] = "during a load repeat: " + contended_repeats[0].fields["contention"]
    if "load_bandwidth_bytes_s" in fields and fields.get("checkpoint_bytes"):
        out["load_bandwidth_bytes_s"] = fields["checkpoint_bytes"] / load_s
    return out


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
        preload = {} if self.env.gpus else quantizer_preload(self.plan.selection.precisions)
        if not self.env.gpus and self.plan.options.scenario == "finetune":
            for name, framework in FRAMEWORKS.items():  # peft, once in the forkserver rather than per worker
                if framework.trainer and framework.start_method == "forkserver":
                    preload[name] = (*preload.get(name, ()), *framework.trainer_packages)
        self.launcher = Launcher(extra_preload=preload)
        self._models: dict[str, ModelSource] = {}
        self._import_s: dict[str, float | None] = {}
        self._bandwidth: dict[str, float | None] = {}
        self._references: dict[tuple[str, str], tuple[str | None, str]] = {}
        self._plans: dict[tuple[str, str], tuple[dict[str, dict[str, Any]] | None, str]] = {}
        self._bandwidth_errors: dict[str, str] = {}

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
            probe = Combo("bandwidth", REFERENCE_FRAMEWORK, "fp32", device)
            job = WorkerJob(combo=probe, model=ModelSource("bandwidth", "", None, None, True),
                            options=self.plan.options, mode="bandwidth", log_path=self._log_path(probe))  # fmt: skip
            result = self.launcher.run(job, self.plan.options.timeout_s)
            self._bandwidth[device] = result.fields.get("memory_bandwidth_bytes_s") if result.ok else None
            if not result.ok:
                self._bandwidth_errors[device] = f"bandwidth worker failed: {result.error}"
        return self._bandwidth[device]

    def memory_plans(self, combo: Combo) -> tuple[dict[str, dict[str, Any]] | None, str]:
        """(plans per precision, error) for the combination's model and device, from config.json only.

        One worker per model and device (the plan builds the model on the meta device, which needs
        torch; the parent never imports it).
        """
        key = (combo.model, combo.device)
        if key not in self._plans:
            probe = Combo(combo.model, REFERENCE_FRAMEWORK, combo.precision, combo.device)
            job = self._job(probe, mode="plan", log_path=self._log_path(probe, "-plan"),
                            fast_bf16=self.capabilities.runs_bf16_well(combo.device),
                            plan_precisions=self.plan.selection.precisions)  # fmt: skip
            result = self.launcher.run(job, self.plan.options.timeout_s)
            self._plans[key] = (result.fields["plans"], "") if result.ok else (None, result.error or "")
        return self._plans[key]

    def reference_model(self, combo: Combo) -> tuple[str | None, str]:
        """(the model whose reference precision `combo` is compared with, reason when there is none):
        the model itself, or for a pre-quantized checkpoint its --reference-model."""
        if self.model(combo.model).quantization is None:
            return combo.model, ""
        reference = self.plan.options.reference_model_for(combo.model)
        if reference is None:
            return None, "a pre-quantized checkpoint has no full-precision reference: give --reference-model DIR"
        return reference, ""

    def reference_paths(self, combo: Combo) -> tuple[str | None, str | None, str]:
        """(reference to read, reference to write, reason when there is none)."""
        precision = self.reference_precision(combo)
        if precision is None or not self.plan.options.quality:
            return None, None, "no precision on this device can serve as the reference"
        model, reason = self.reference_model(combo)
        if model is None:
            return None, None, reason
        key = (model, combo.device)
        path = str(self.writer.path / "reference" / f"{_safe_name(model)}-{combo.device}-{precision}.npz")
        if Path(path).exists():
            return path, None, ""
        is_reference = combo.framework == REFERENCE_FRAMEWORK and combo.precision == precision and model == combo.model
        if is_reference:
            return path, path, ""
        if key not in self._references:
            reference = Combo(model, REFERENCE_FRAMEWORK, precision, combo.device)
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
        options = self.plan.options
        try:
            reason = skip_reason(combo, lambda: self.model(combo.model), self.capabilities, options)
        except Exception as exc:  # a zoo build that fails is this combination's failure
            record = _outcome(combo, "failed", error_kind="error", error=one_line(exc))
        else:
            if reason is not None:
                known = self._models.get(combo.model)
                record = _outcome(combo, "skipped", skip_reason=reason, model_source=known and known.source)
            elif options.scenario == "finetune":
                record = self._measure_finetune(combo, self.model(combo.model))
            else:
                record = self._measure_inference(combo, self.model(combo.model))
        record.scenario = options.scenario
        explain_nulls(record, FRAMEWORKS[combo.framework])
        return record

    def _measure_inference(self, combo: Combo, model: ModelSource) -> Record:
        """The plan's pre-flight, the main worker, the load repeats and the cold-load worker."""
        options = self.plan.options
        predicted, plan_note = self._preflight(combo)
        if plan_note.startswith("skip:"):
            return _outcome(combo, "skipped", skip_reason=plan_note.removeprefix("skip:"), model_source=model.source,
                            **predicted)  # fmt: skip
        read_ref, write_ref, ref_reason = self.reference_paths(combo) if options.quality else (None, None, "")
        bandwidth = self.bandwidth(combo.device) if options.throughput else None
        job = self._job(combo, mode="full", reference_path=read_ref, write_reference_path=write_ref,
                        reference_note=ref_reason, memory_bandwidth_bytes_s=bandwidth,
                        log_path=self._log_path(combo))  # fmt: skip
        main = self.launcher.run(job, options.timeout_s)
        record = self._to_record(combo, model, main, self._load_repeats(combo, main))
        if record.status == "ok" and options.cold:
            self._add_cold_load(record, combo)
        record.import_s = self.import_s(combo.framework)
        if record.import_s is None:
            record.na_reasons["import_s"] = f"the import probe of {combo.framework} failed in a fresh interpreter"
        _add_predicted(record, predicted, plan_note)
        if record.status == "ok" and options.throughput and bandwidth is None:
            reason = self._bandwidth_errors.get(combo.device, "no bandwidth measured")
            for name in ("memory_bandwidth_bytes_s", "decode_roofline_tok_s", "decode_roofline_frac"):
                record.na_reasons.setdefault(name, reason)
        if read_ref is not None:
            record.reference_precision = self.reference_precision(combo)
            record.reference_model = self.reference_model(combo)[0]
        elif record.status == "ok":
            record.na_reasons["reference_model"] = record.na_reasons.get("reference_precision", "no reference")
        return record

    def _add_cold_load(self, record: Record, combo: Combo) -> None:
        """The cold-load worker's fields (raw read, a load after dropping the page cache), or their reason."""
        cold = self.launcher.run(self._job(combo, mode="cold", log_path=self._log_path(combo, "-cold")),
                                 self.plan.options.timeout_s)  # fmt: skip
        for name in COLD_FIELDS:
            if cold.ok and cold.fields.get(name) is not None:
                setattr(record, name, cold.fields[name])
                record.na_reasons.pop(name, None)
            elif not cold.ok:
                record.na_reasons[name] = f"cold-load worker failed: {cold.error}"
            else:
                record.na_reasons[name] = "no checkpoint bytes or raw read to compare with"

    # --- the finetune scenario ----------------------------------------------------------------

    def _measure_finetune(self, combo: Combo, model: ModelSource) -> Record:
        """A training worker (harness.measure.finetune), then an adapter round-trip worker on a fresh base."""
        options = self.plan.options
        predicted, plan_note = self._training_preflight(combo)
        if plan_note.startswith("skip:"):
            return _outcome(combo, "skipped", skip_reason=plan_note.removeprefix("skip:"), model_source=model.source,
                            **predicted)  # fmt: skip
        adapter_dir = str(self.writer.path / "adapters" / _safe_name(combo.id))
        job = self._job(combo, mode="finetune", adapter_dir=adapter_dir, log_path=self._log_path(combo))
        main = self.launcher.run(job, options.timeout_s)
        record = self._to_record(combo, model, main, [])
        _add_predicted(record, predicted, plan_note)
        if record.status != "ok":
            return record
        check = self.launcher.run(
            self._job(combo, mode="adapter", adapter_dir=adapter_dir, log_path=self._log_path(combo, "-adapter")),
            options.timeout_s,
        )
        names = ("adapter_roundtrip_kl", "adapter_roundtrip_max_abs_diff", "merged_kl", "merged_max_abs_diff")
        if check.ok:
            record.na_reasons.update(check.fields.pop("na_reasons", {}))
            for name in names:
                setattr(record, name, check.fields.get(name))
        else:
            for name in names:
                record.na_reasons[name] = f"adapter round-trip worker failed: {check.error}"
        if record.lora_method == "full":  # a whole model copy: the round trip has read it, the run dir keeps none
            import shutil

            shutil.rmtree(adapter_dir, ignore_errors=True)
        return record

    def _training_preflight(self, combo: Combo) -> tuple[dict[str, int | None], str]:
        """(predicted training fields, note), like `_preflight` but from the training plan (harness.plan.trainplan)."""
        from harness.plan.preflight import available_bytes, training_fit

        names = tuple(f"predicted_{phase}_bytes" for phase in TRAIN_PHASES)
        empty: dict[str, int | None] = dict.fromkeys(names)
        if combo.framework != REFERENCE_FRAMEWORK:
            return empty, (
                f"the training plan simulates {REFERENCE_FRAMEWORK} with peft's LoRA on every Linear; "
                f"{combo.framework} trains KerasHub's own adapters"
            )
        plans, error = self.memory_plans(combo)
        if plans is None:
            return empty, f"training memory plan failed: {error}"
        plan = plans[combo.precision]
        if isinstance(plan, str):
            return empty, f"no training plan: {plan}"
        predicted = dict(
            zip(names, (plan["forward_bytes"], plan["backward_bytes"], plan["optimizer_bytes"]), strict=True)
        )
        options = self.plan.options
        if not options.preflight:
            return predicted, ""
        available = available_bytes(combo.device, self.capabilities, options.available_memory_bytes)
        verdict = training_fit(combo, plans, available)
        return predicted, f"skip:{verdict.reason}" if verdict.reason else ""

    def _load_repeats(self, combo: Combo, main: WorkerResult) -> list[WorkerResult]:
        """Fresh-worker loads after the main one. With --repeats 3 or more (the default is 3): until
        load_s's median is stable (harness.stats) or --time-budget is spent, at least --repeats
        loads in all. Below 3, exactly --repeats loads: the user asked for fewer, at a known cost."""
        if not main.ok:
            return []
        options = self.plan.options
        if options.repeats < MIN_SAMPLES:
            job = self._job(combo, mode="load", log_path=self._log_path(combo))
            return [self.launcher.run(job, options.timeout_s) for _ in range(options.repeats - 1)]
        policy = RepeatPolicy(options.target_ci_rel, options.time_budget_s, options.repeats, 0.0, 10 * options.repeats)
        extra: list[WorkerResult] = []
        samples, spent = [main.fields["load_s"]], main.fields["load_s"]
        while stop_reason(samples, spent, policy) is None:
            job = self._job(combo, mode="load", log_path=self._log_path(combo))
            result = self.launcher.run(job, options.timeout_s)
            extra.append(result)
            if not result.ok:
                break
            samples.append(result.fields["load_s"])
            spent += result.fields["load_s"]
        if stop_reason(samples, spent, policy) in ("budget", "max"):
            main.fields.setdefault("budget_limited", []).insert(0, "load")
        return extra

    def _preflight(self, combo: Combo) -> tuple[dict[str, int | None], str]:
        """(predicted fields, note): the note is `skip:<reason>` when the plan does not fit, else why
        the predictions that are missing are missing (empty when all are present)."""
        from harness.plan.memplan import GPU_HOST_REASON
        from harness.plan.preflight import available_bytes, fit

        names = ("predicted_weight_bytes", "predicted_peak_bytes", "predicted_host_peak_bytes",
                 "predicted_device_peak_bytes")  # fmt: skip
        empty: dict[str, int | None] = dict.fromkeys(names)
        plans, error = self.memory_plans(combo)
        if plans is None:
            return empty, f"memory plan failed: {error}"
        plan = plans[combo.precision]
        predicted = {
            "predicted_weight_bytes": plan["weight_bytes"],
            "predicted_peak_bytes": plan["peak_bytes"],
            "predicted_host_peak_bytes": plan.get("host_peak_bytes"),
            "predicted_device_peak_bytes": plan.get("device_peak_bytes"),
        }
        if predicted["predicted_host_peak_bytes"] is None and predicted["predicted_device_peak_bytes"] is None:
            note = f"the memory plan models no phase of {combo.framework} workers yet, only their weights"
        elif predicted["predicted_device_peak_bytes"] is None:
            note = "cpu: the host is the device; see predicted_host_peak_bytes"
        else:
            note = GPU_HOST_REASON
        options = self.plan.options
        if not options.preflight:
            return predicted, note
        available = available_bytes(combo.device, self.capabilities, options.available_memory_bytes)
        verdict = fit(combo, plans, available)
        return predicted, f"skip:{verdict.reason}" if verdict.reason else note

    @staticmethod
    def _to_record(combo: Combo, model: ModelSource, main: WorkerResult, extra: list[WorkerResult]) -> Record:
        """The record of the main worker's fields and the load repeats' (null reasons: explain_nulls)."""
        identity = dict(model_source=model.source, model_revision=model.revision, tokenizer_source=model.tokenizer,
                        quantization=model.quantization)  # fmt: skip
        if not main.ok:
            return _outcome(combo, "failed", error_kind=main.error_kind, error=main.error, model_kind=model.kind,
                            worker_wall_s=main.wall_s, **identity)  # fmt: skip
        fields = dict(main.fields)
        reasons = fields.pop("na_reasons", {})
        fields.update(_load_fields(main, extra, reasons))
        record = _outcome(combo, "ok", worker_wall_s=main.wall_s, worker_start_s=main.start_s, na_reasons=reasons,
                          **identity)  # fmt: skip
        for name, value in fields.items():
            if name not in Record.__dataclass_fields__:
                raise KeyError(f"worker returned unknown field {name!r}")
            setattr(record, name, value)
        if record.model_kind is None:
            record.model_kind = model.kind
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
