"""Why a combination is skipped, and why a field of its record is null: each decided here, in the parent.

skip_reason runs before any worker starts (the memory plan's skip is the pre-flight's, harness.plan.preflight);
explain_nulls runs on every finished ok record, so no null field is left without its reason.
"""

from __future__ import annotations

from collections.abc import Callable

from harness.options import RunOptions
from harness.plan.matrix import Capabilities, Combo, is_installed, unsupported_reason
from harness.plan.models import ModelSource, precision_model_reason, unsupported_model_reason
from harness.records import NO_TOKENIZER_REASON, NVML_NO_PID_REASON, Record, training_fields
from harness.registry import FRAMEWORKS, PRECISIONS, Framework, load_object, training_skip_reason

TRAINING_SCENARIO_NOTE = "not measured by the inference scenario: --scenario finetune trains"
INFERENCE_SCENARIO_NOTE = "not measured by the finetune scenario: --scenario inference measures it"
NOT_APPLICABLE = {
    "quantizer_import_s": "this precision imports no quantizer library beyond the framework",
    "device_init_s": "no CUDA context: the device is not a CUDA GPU",
    "quant_state_device": "not quantized: no quantization state",
    "convert_s": "no conversion: only llama.cpp converts the checkpoint (to GGUF)",
    "convert_recorded_s": "no conversion: only llama.cpp converts the checkpoint (to GGUF)",
    "gguf_reused": "no conversion: only llama.cpp converts the checkpoint (to GGUF)",
}
DEVICE_FIELDS = ("peak_device_allocated_bytes", "peak_device_reserved_bytes", "device_process_bytes")


def skip_reason(
    combo: Combo, model_of: Callable[[], ModelSource], capabilities: Capabilities, options: RunOptions
) -> str | None:
    """Why `combo` is skipped before any worker runs, or None. In order: the device, framework and
    precision rules (harness.plan.matrix); the model's kind and format (harness.plan.models); in the finetune
    scenario the registry's training rules and the trainer's packages; the framework's architectures.
    `model_of()` builds or resolves the model on first need: a build that fails raises."""
    reason = unsupported_reason(combo, capabilities)
    if reason is not None:
        return reason
    model = model_of()
    reason = unsupported_model_reason(model) or precision_model_reason(PRECISIONS[combo.precision].family, model)
    if reason is None and options.scenario == "finetune":
        reason = training_reason(combo, model, options.lora_rank)
    framework = FRAMEWORKS[combo.framework]
    if reason is None and framework.model_support is not None:
        reason = load_object(framework.model_support)(model.model_type, model.kind)
    return reason


def training_reason(combo: Combo, model: ModelSource, lora_rank: int) -> str | None:
    """Why `combo` has no training step (registry rules), or a missing trainer package, or None."""
    reason = training_skip_reason(combo.framework, combo.precision, model.kind, lora_rank)
    if reason is not None:
        return reason
    framework = FRAMEWORKS[combo.framework]
    missing = [p for p in framework.trainer_packages if not is_installed(p)]
    if missing:
        return f"the finetune scenario needs {', '.join(missing)}: pip install 'harness[{framework.trainer_extra}]'"
    return None


def explain_nulls(record: Record, framework: Framework) -> None:
    """Give each null field of an ok record its reason, where nothing more specific was recorded: the
    device fields a CPU or XLA run has not, what the framework never reports, what does not apply to
    this precision or checkpoint, and what the other scenario measures."""
    if record.status != "ok":
        return
    reasons = record.na_reasons
    if record.device == "cpu":
        reasons.update(dict.fromkeys(DEVICE_FIELDS, "cpu: the host is the device; see the host memory fields"))
    elif record.device.startswith("xla"):
        reasons.update(dict.fromkeys(DEVICE_FIELDS, "xla: torch_xla does not report per-process device memory here"))
    else:
        reasons.update({n: r for n, r in framework.null_field_reasons.items() if getattr(record, n) is None})
        if record.device_process_bytes is None:
            reasons["device_process_bytes"] = NVML_NO_PID_REASON
    for name, reason in NOT_APPLICABLE.items():
        if getattr(record, name) is None:
            reasons.setdefault(name, reason)
    if record.quantization is None:
        reasons["quantization"] = "not a pre-quantized checkpoint: the harness quantized it at load"
    if record.model_revision is None:
        reasons["model_revision"] = "a local directory, not a hub snapshot"
    if record.tokenizer_source is None:
        reasons["tokenizer_source"] = NO_TOKENIZER_REASON
    if record.checkpoint_bytes is None:
        reasons.setdefault("checkpoint_bytes", "no weight files found in the checkpoint directory")
    _explain_scenario_nulls(record)


def _explain_scenario_nulls(record: Record) -> None:
    """Every null field the other scenario measures gets that reason (each record is one scenario's)."""
    training = set(training_fields())
    for name in Record.field_names():
        if getattr(record, name) is not None or name in record.na_reasons:
            continue
        if record.scenario == "finetune" and name not in training:
            record.na_reasons[name] = INFERENCE_SCENARIO_NOTE
        elif record.scenario == "inference" and name in training:
            record.na_reasons[name] = TRAINING_SCENARIO_NOTE
