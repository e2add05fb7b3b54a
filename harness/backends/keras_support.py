"""Which Hugging Face architectures KerasHub can load, without importing TensorFlow or Keras.

KerasHub (0.32) converts a local Hugging Face directory by its config.json `model_type`; the
table below lists the text architectures this harness runs through it, with the KerasHub class
each becomes. Checked against keras_hub/src/utils/transformers/preset_loader.py; the zoo's
llama, gpt2 and bert are tested end to end, the rest are listed by KerasHub's converters.
"""

from __future__ import annotations

from types import MappingProxyType

# HF model_type -> KerasHub task class (causal LMs, loaded with preprocessor=None).
CAUSAL_LM_CLASSES = MappingProxyType(
    {
        "llama": "Llama3CausalLM",
        "gpt2": "GPT2CausalLM",
        "mistral": "MistralCausalLM",
        "qwen2": "QwenCausalLM",
        "qwen3": "Qwen3CausalLM",
        "gemma": "GemmaCausalLM",
        "gemma2": "GemmaCausalLM",
        "mixtral": "MixtralCausalLM",
        "qwen2_moe": "QwenMoeCausalLM",
        "qwen3_moe": "Qwen3MoeCausalLM",
        "smollm3": "SmolLM3CausalLM",
    }
)
# HF model_type -> KerasHub backbone class (encoders, mean-pooled over the sequence output).
ENCODER_CLASSES = MappingProxyType(
    {
        "bert": "BertBackbone",
        "roberta": "RobertaBackbone",
        "xlm-roberta": "XLMRobertaBackbone",
        "distilbert": "DistilBertBackbone",
        "albert": "AlbertBackbone",
    }
)
# Checkpoints that load only with a caveat: the skip reason's advice when loading fails.
CAVEATS = MappingProxyType(
    {"bert": "KerasHub's BertBackbone needs the pooler weights (pooler.dense.*): save a BertModel, not BertForMaskedLM"}
)


def keras_class_name(model_type: str | None, kind: str | None) -> str | None:
    """The KerasHub class for this architecture and kind, or None when there is none."""
    table = ENCODER_CLASSES if kind == "encoder" else CAUSAL_LM_CLASSES
    return table.get(model_type or "")


def tensorflow_unsupported_reason(model_type: str | None, kind: str | None) -> str | None:
    """Why KerasHub cannot load this architecture for TensorFlow, or None when it can (or when
    the model type is not known before loading, e.g. a hub id: the worker then decides)."""
    if model_type is None:
        return None
    if keras_class_name(model_type, kind) is not None:
        return None
    other = keras_class_name(model_type, "causal-lm" if kind == "encoder" else "encoder")
    if other is not None:
        return f"KerasHub loads '{model_type}' only as {other}, not as {kind or 'a causal LM'}"
    known = sorted(CAUSAL_LM_CLASSES if kind != "encoder" else ENCODER_CLASSES)
    what = "encoder" if kind == "encoder" else "causal LM"
    return (
        f"KerasHub has no converter for Hugging Face model_type '{model_type}' as a {what}; "
        f"TensorFlow runs: {', '.join(known)}"
    )
