"""`--matrix FILE`: a TOML file declaring the matrix, run options, budgets and tolerances.

    models = ["tiny-llama", "minilm"]
    precisions = ["fp32", "bf16", "int8", "nf4"]
    devices = ["cpu"]
    frameworks = ["pytorch"]

    [options]                 # any RunOptions field, e.g.
    repeats = 3
    prompt_lengths = [128, 512]
    timeout_s = 300

    [budgets]                 # a breach fails that test and prints the numbers
    max_load_s = 5.0
    max_weight_bytes = 2_000_000_000
    min_decode_tok_s = 10
    max_kl_mean = 0.05

    [tolerances]              # compat: max kl_mean (decoders) or 1 - cosine (encoders)
    nf4 = 0.8

    [models.tiny-llama]       # per-model overrides
    precisions = ["fp32", "nf4"]
    budgets = { max_load_s = 2.0 }
    tolerances = { nf4 = 1.0 }
    tokenizer = "/path/to/tokenizer"   # for a weights-only checkpoint (else --tokenizer)

    [models."/ckpt/llama-nf4"]          # a pre-quantized checkpoint, run as saved
    precisions = ["as-saved"]
    reference_model = "/ckpt/llama"     # its full-precision original (else --reference-model)

Every key and value is validated; a bad one is a one-line error naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.checks import BUDGET_CHECKS
from harness.errors import UsageError
from harness.options import RunOptions
from harness.plan.matrix import Combo
from harness.registry import PRECISIONS

AXES = ("models", "frameworks", "precisions", "devices")
BUDGETS = tuple(BUDGET_CHECKS)  # from the metrics declared with budget=True (harness.records)
# Field annotations are strings here (config.py uses `from __future__ import annotations`).
OPTION_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(RunOptions)}
MODEL_KEYS = ("precisions", "frameworks", "devices", "budgets", "tolerances", "tokenizer", "reference_model")


@dataclass(frozen=True)
class MatrixFile:
    """A validated matrix file."""

    path: Path
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)

    def budgets_for(self, model: str) -> dict[str, float]:
        return self.budgets | self.per_model.get(model, {}).get("budgets", {})

    def tolerances_for(self, model: str) -> dict[str, float]:
        return self.tolerances | self.per_model.get(model, {}).get("tolerances", {})

    def admits(self, combo: Combo) -> bool:
        """Per-model axis overrides narrow the matrix for that model."""
        chosen = self.per_model.get(combo.model, {})
        return all(getattr(combo, axis[:-1]) in chosen.get(axis, (getattr(combo, axis[:-1]),)) for axis in AXES[1:])


def matrix_axes(value_of: Callable[[str], str | None], matrix_file: MatrixFile | None) -> tuple[str | None, ...]:
    """models, frameworks, precisions, devices: each as given on the command line, else the matrix file's."""
    axes = matrix_file.axes if matrix_file else {}
    return tuple(value_of(a) or (",".join(axes[a]) if a in axes else None) for a in AXES)


def _fail(path: Path, message: str) -> UsageError:
    return UsageError(f"{path}: {message}")


def _string_list(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise _fail(path, f'{where} must be a non-empty list of strings, e.g. ["fp32", "nf4"]')
    return tuple(value)


def _numbers(path: Path, where: str, table: Any, allowed: tuple[str, ...] | None) -> dict[str, float]:
    if not isinstance(table, dict):
        raise _fail(path, f"[{where}] must be a table of numbers")
    for key, value in table.items():
        if allowed is not None and key not in allowed:
            raise _fail(path, f"unknown key '{key}' in [{where}]; use one of {', '.join(allowed)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise _fail(path, f"[{where}] {key} must be a non-negative number, got {value!r}")
    return {k: float(v) for k, v in table.items()}


def _option(path: Path, key: str, value: Any) -> Any:
    kind = OPTION_TYPES.get(key)
    if kind is None:
        raise _fail(path, f"unknown key '{key}' in [options]; use one of {', '.join(OPTION_TYPES)}")
    if kind.startswith("tuple[int"):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise _fail(path, f"[options] {key} must be a list of integers, e.g. [128, 512]")
        return tuple(value)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise _fail(path, f"[options] {key} must be true or false")
        return value
    if kind.startswith(("int", "float")):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, f"[options] {key} must be a number, got {value!r}")
        return value
    if not isinstance(value, str):
        raise _fail(path, f"[options] {key} must be a string")
    return Path(value) if kind.startswith("Path") else value


def load_matrix_file(path: Path) -> MatrixFile:
    """Parse and validate a matrix file."""
    if not path.is_file():
        raise UsageError(f"--matrix {path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, f"not valid TOML ({exc})") from None
    allowed = (*AXES, "options", "budgets", "tolerances")
    axes, per_model, options, tokenizers, references = {}, {}, {}, {}, {}
    for key, value in data.items():
        if key not in allowed:
            raise _fail(path, f"unknown key '{key}'; use one of {', '.join(allowed)}")
        if key in AXES and not (key == "models" and isinstance(value, dict)):
            axes[key] = _string_list(path, key, value)
    models = data.get("models")
    if isinstance(models, dict):  # [models.NAME] tables: the model list is their names
        axes["models"] = tuple(models)
        for name, table in models.items():
            if not isinstance(table, dict):
                raise _fail(path, f"[models.{name}] must be a table")
            for key in table:
                if key not in MODEL_KEYS:
                    raise _fail(path, f"unknown key '{key}' in [models.{name}]; use one of {', '.join(MODEL_KEYS)}")
            per_model[name] = {
                **{a: _string_list(path, f"models.{name}.{a}", table[a]) for a in AXES[1:] if a in table},
                "budgets": _numbers(path, f"models.{name}.budgets", table.get("budgets", {}), BUDGETS),
                "tolerances": _numbers(
                    path, f"models.{name}.tolerances", table.get("tolerances", {}), tuple(PRECISIONS)
                ),
            }
            for key, found in (("tokenizer", tokenizers), ("reference_model", references)):
                if key in table:
                    if not isinstance(table[key], str):
                        raise _fail(path, f"models.{name}.{key} must be a path or hub id string")
                    found[name] = table[key]
    for key, value in (data.get("options") or {}).items():
        options[key] = _option(path, key, value)
    if tokenizers:
        options["model_tokenizers"] = tuple(tokenizers.items())
    if references:
        options["model_references"] = tuple(references.items())
    try:
        RunOptions(**options)
    except UsageError as exc:
        raise _fail(path, f"[options] {exc}") from None
    return MatrixFile(
        path=path,
        axes=axes,
        options=options,
        budgets=_numbers(path, "budgets", data.get("budgets", {}), BUDGETS),
        tolerances=_numbers(path, "tolerances", data.get("tolerances", {}), tuple(PRECISIONS)),
        per_model=per_model,
    )
