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
    """A model as the worker loads it: a local directory (a hub id resolves to its cached snapshot)."""

    name: str  # as the user wrote it; used in ids and reports
    source: str  # path (or, before resolution, hub id) passed to from_pretrained
    kind: str | None  # causal-lm | encoder | encoder-decoder | other-head (decided from config.json)
    model_type: str | None  # config.json's model_type, when known before loading
    is_local: bool
    revision: str | None = None  # hub snapshot commit hash
    tokenizer: str | None = None  # tokenizer dir or hub id; None: the model has none (quality is null)
    architecture: str | None = None  # config.json's first architecture
    quantization: str | None = None  # a pre-quantized checkpoint's method, bits and group size (config.json)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def model_kind_from_config(config: dict) -> str:
    """causal-lm (an LM head), encoder (an encoder-only base or head), encoder-decoder (T5, BART),
    or other-head (a decoder-only architecture with a non-LM head, e.g. sequence classification)."""
    architectures = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        return "encoder-decoder"
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        return "causal-lm"
    if not architectures:
        return "causal-lm"
    if any(a.endswith(TASK_HEAD_SUFFIXES) for a in architectures) and _is_decoder_only(config.get("model_type")):
        return "other-head"
    return "encoder"


TASK_HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def _is_decoder_only(model_type: str | None) -> bool:
    """Is this model_type one transformers builds as a causal LM (so a task head is not an encoder's)?

    Imports transformers' auto-model tables, which import torch (~2 s), so it is asked only for
    checkpoints whose architecture is a task head.
    """
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED
    except ImportError:
        return False
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type in MODEL_MAPPING_NAMES
        and model_type not in MASKED
    )


def describe_quantization(config: dict) -> str | None:
    """`method, N-bit, group G` of a pre-quantized checkpoint's quantization_config, or None.

    Reads the keys transformers' configs write: quant_method; bits / nbits / weights ("int4");
    load_in_4bit/8bit and bnb_4bit_quant_type; group_size / q_group_size; torchao's quant_type.
    """
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    method = str(quantization.get("quant_method", "unknown"))
    parts = [method]
    bits = quantization.get("bits") or quantization.get("nbits")
    if quantization.get("load_in_4bit"):
        bits = 4
        parts.append(str(quantization.get("bnb_4bit_quant_type", "")))
    elif quantization.get("load_in_8bit"):
        bits = 8
    weights = quantization.get("weights")
    if isinstance(weights, str):
        parts.append(f"weights {weights}")
    quant_type = quantization.get("quant_type")
    if isinstance(quant_type, dict):
        parts.append(", ".join(str(v.get("_type", v)) if isinstance(v, dict) else str(v) for v in quant_type.values()))
    if bits:
        parts.append(f"{bits}-bit")
    group = quantization.get("group_size") or quantization.get("q_group_size")
    if group:
        parts.append(f"group {group}")
    return ", ".join(p for p in parts if p)


def precision_model_reason(precision_family: str, model: ModelSource) -> str | None:
    """A pre-quantized checkpoint runs only as `as-saved`; `as-saved` needs a pre-quantized checkpoint."""
    if precision_family == "pre-quantized" and model.quantization is None:
        return f"{model.name} has no quantization_config in config.json: as-saved is for pre-quantized checkpoints"
    if precision_family != "pre-quantized" and model.quantization is not None:
        return (
            f"{model.name} is already quantized ({model.quantization}): run it as --precisions as-saved, "
            "with --reference-model DIR for its full-precision reference"
        )
    return None


def unsupported_model_reason(model: ModelSource) -> str | None:
    """Why the harness does not load this model at all (decided before any worker starts)."""
    architecture = model.architecture or model.model_type
    if model.kind == "encoder-decoder":
        return (
            f"{architecture} is an encoder-decoder model, not a causal LM or an encoder: "
            "the harness measures decoder-only LMs and encoders, and never loads it as the wrong class"
        )
    if model.kind == "other-head":
        return (
            f"{architecture} has a task head, not a language-model head: give the ...ForCausalLM checkpoint; "
            "the harness never loads it as the wrong class"
        )
    return None


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


def _from_directory(
    name: str, path: Path, config: dict, tokenizer: str | None, revision: str | None = None
) -> ModelSource:
    tokenizer = tokenizer or (str(path) if has_tokenizer(path) else None)
    architectures = config.get("architectures") or [None]
    return ModelSource(name, str(path), model_kind_from_config(config), config.get("model_type"), True,
                       revision, tokenizer, architectures[0], describe_quantization(config))  # fmt: skip


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub id: from the Hugging Face cache, else downloaded (weights,
    config, tokenizer only). With HF_HUB_OFFLINE=1 a model missing from the cache is a one-line error."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    fill = (
        f"fill the cache on a connected machine (`hf download {repo_id}`, cache dir {constants.HF_HUB_CACHE}) "
        "and copy it here, or point --models at a local checkpoint directory"
    )
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"'{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1: {fill}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as exc:
        raise UsageError(f"'{repo_id}' could not be downloaded ({type(exc).__name__}): {fill}") from None


def resolve_model(
    entry: str, allow_pickle: bool = False, trust_remote_code: bool = False, tokenizer: str | None = None
) -> ModelSource:
    """Zoo name, local checkpoint directory, or hub id (resolved to its cached snapshot);
    anything else is a usage error. `tokenizer` (--tokenizer) overrides the model's own."""
    if tokenizer is not None and _looks_like_path(tokenizer) and not Path(tokenizer).expanduser().is_dir():
        raise UsageError(f"--tokenizer '{tokenizer}' is not a directory: give a tokenizer directory or a hub id")
    if tokenizer is not None and Path(tokenizer).expanduser().is_dir():
        tokenizer = str(Path(tokenizer).expanduser().resolve())
    if entry in ZOO:
        return ModelSource(entry, str(entry), ZOO[entry].kind, None, True, None, tokenizer)
    if _looks_like_path(entry):
        if not entry.startswith(("/", ".", "~")) and not Path(entry).exists() and "/" not in entry:
            raise UsageError(
                f"unknown model '{entry}': use a zoo name ({', '.join(ZOO)}), a checkpoint directory or a hub id org/name"
            )
        path = Path(entry).expanduser()
        config = _check_local_dir(entry, path, allow_pickle, trust_remote_code)
        return _from_directory(entry, path.resolve(), config, tokenizer)
    path = hub_snapshot(entry)
    config = _check_local_dir(entry, path, allow_pickle, trust_remote_code)
    return _from_directory(entry, path, config, tokenizer, revision=path.name)


def materialize(model: ModelSource) -> ModelSource:
    """Build a zoo model if needed and return a source that points at its directory."""
    if model.name in ZOO and model.source == model.name:
        path = ensure_built(model.name)
        config = json.loads((path / "config.json").read_text())
        return _from_directory(model.name, path, config, model.tokenizer)
    return model
