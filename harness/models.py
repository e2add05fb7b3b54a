"""Turning a `--models` entry into something from_pretrained can load, with early, one-line errors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.zoo import ZOO, ensure_built

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class ModelSource:
    """A model as the worker loads it: a local directory or a hub id."""

    name: str  # as the user wrote it; used in ids and reports
    source: str  # path or hub id passed to from_pretrained
    kind: str | None  # causal-lm | encoder | None (decided after reading the config)
    model_type: str | None  # config.json's model_type, when known before loading
    is_local: bool


def model_kind_from_config(config: dict) -> str:
    """causal-lm when an architecture has a language-model head, else encoder."""
    architectures = config.get("architectures") or []
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        return "causal-lm"
    return "encoder" if architectures else "causal-lm"


def _looks_like_path(entry: str) -> bool:
    return entry.startswith(("/", ".", "~")) or Path(entry).exists() or not HUB_ID.match(entry)


def _check_local_dir(entry: str, path: Path, allow_pickle: bool, trust_remote_code: bool) -> dict:
    if not path.exists():
        raise UsageError(f"model path '{entry}' does not exist: give a zoo name, a checkpoint directory or a hub id")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"'{entry}' has no config.json: point --models at a Hugging Face checkpoint directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"'{entry}/config.json' is not valid JSON ({exc.msg}): re-save the checkpoint") from None
    files = [p.name for p in path.iterdir()]
    has_safetensors = any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files)
    has_pickle = any(f.endswith(PICKLE_SUFFIXES) for f in files)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise UsageError(
            f"'{entry}' has only pickle weights, which can run code when loaded: "
            "convert it to safetensors, or pass --allow-pickle if you trust it"
        )
    if not has_safetensors and not has_pickle:
        raise UsageError(f"'{entry}' has no weight files (*.safetensors): save the model with save_pretrained")
    if "auto_map" in config and not trust_remote_code and not _natively_supported(config):
        raise UsageError(
            f"'{entry}' needs its own Python code (auto_map in config.json): pass --trust-remote-code if you trust it"
        )
    return config


def _natively_supported(config: dict) -> bool:
    """Does transformers itself know this model_type (so remote code is not needed)?"""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return False
    return config.get("model_type") in CONFIG_MAPPING_NAMES


def resolve_model(entry: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """Zoo name, local checkpoint directory, or hub id; anything else is a usage error."""
    if entry in ZOO:
        return ModelSource(entry, str(entry), ZOO[entry].kind, None, True)
    if _looks_like_path(entry):
        if not entry.startswith(("/", ".", "~")) and not Path(entry).exists() and "/" not in entry:
            raise UsageError(
                f"unknown model '{entry}': use a zoo name ({', '.join(ZOO)}), a checkpoint directory or a hub id org/name"
            )
        path = Path(entry).expanduser()
        config = _check_local_dir(entry, path, allow_pickle, trust_remote_code)
        return ModelSource(entry, str(path.resolve()), model_kind_from_config(config), config.get("model_type"), True)
    return ModelSource(entry, entry, None, None, False)


def materialize(model: ModelSource) -> ModelSource:
    """Build a zoo model if needed and return a source that points at its directory."""
    if model.name in ZOO and model.source == model.name:
        path = ensure_built(model.name)
        config = json.loads((path / "config.json").read_text())
        return ModelSource(model.name, str(path), model.kind, config.get("model_type"), True)
    return model


def check_safetensors_files(source: str) -> None:
    """Raise a one-line error if a local safetensors file is truncated or its header is corrupt."""
    path = Path(source)
    if not path.is_dir():
        return
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        fix = "re-save or re-download the checkpoint"
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"{file.name} is corrupted (bad header length): {fix}")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{file.name} is corrupted (unreadable header): {fix}") from None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and "data_offsets" in t]
        expected = 8 + header_len + max(ends, default=0)
        if size < expected:
            raise ValueError(f"{file.name} is truncated ({size} of {expected} bytes): {fix}")
