"""Small real checkpoints of architectures beyond the zoo, for tests and benchmarks.

Each builder writes a Hugging Face directory with save_pretrained (safetensors) and, by default,
the zoo tokenizer, so from_pretrained loads it exactly as a user's checkpoint. Dimensions keep
most weights in Linear layers (hidden 128-256, 2-4 layers, vocab 1024), hidden sizes are
multiples of 64 (bitsandbytes' 4-bit block), and weights are seeded. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.zoo.config import SEED, SPECIAL_IDS, VOCAB_SIZE, tiny_llama_config

CAUSAL_ARCHS: tuple[str, ...] = ("qwen2", "mistral", "phi3", "gpt_neox", "opt", "gemma")
ENCODER_DECODER_ARCHS: tuple[str, ...] = ("t5", "bart")
ARCHS: tuple[str, ...] = CAUSAL_ARCHS + ENCODER_DECODER_ARCHS
LARGE_VOCAB_SIZE = 128_256  # Llama 3's vocabulary
# Embedding rows beyond the zoo vocabulary, per architecture whose transformers 5 tokenizer class adds
# tokens when it loads the zoo tokenizer: Qwen2Tokenizer adds "<|endoftext|>" (its unk default) as
# id 1024, which a 1024-row embedding cannot look up (and llama.cpp's converter rejects). Qwen's own
# checkpoints pad the same way (151,936 rows for 151,665 tokens).
VOCAB_PADDING: dict[str, int] = {"qwen2": 64}

# Per architecture: config.json values (beside vocab and special ids). Tied and untied
# embeddings, GQA / MQA / MHA, biases and fused projections are all represented.
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": dict(  # q/k/v biases, GQA 4/2, tied like Qwen2.5-0.5B
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "mistral": dict(  # GQA 8/2, sliding window, untied
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, sliding_window=256,
        tie_word_embeddings=False,
    ),
    "phi3": dict(  # fused qkv_proj and gate_up_proj, MHA
        hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=6, max_position_embeddings=1024, original_max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "gpt_neox": dict(  # fused qkv with biases, partial rotary, parallel residual
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
        rotary_pct=0.25, max_position_embeddings=1024, tie_word_embeddings=False,
    ),
    "opt": dict(  # learned positions, biases everywhere, tied
        hidden_size=192, ffn_dim=768, num_hidden_layers=3, num_attention_heads=6,
        word_embed_proj_dim=192, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "gemma": dict(  # multi-query attention (1 KV head), head_dim set apart from hidden/heads, tied
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "t5": dict(
        d_model=128, d_ff=256, d_kv=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, tie_word_embeddings=True,
    ),
    "bart": dict(
        d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=1024, decoder_start_token_id=2,
        forced_eos_token_id=None,
    ),
}  # fmt: skip


def arch_config(arch: str, *, vocab_size: int = VOCAB_SIZE, **overrides: Any):
    """The transformers config object of a small `arch` model (vocab_size + VOCAB_PADDING rows)."""
    from transformers import AutoConfig

    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(ARCHS)}")
    values = {**ARCH_CONFIGS[arch], **SPECIAL_IDS, "vocab_size": vocab_size + VOCAB_PADDING.get(arch, 0),
              "initializer_range": 0.1}  # fmt: skip
    values.update(overrides)
    return AutoConfig.for_model(arch, **values)


def _model_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if arch in ENCODER_DECODER_ARCHS else AutoModelForCausalLM


def _save(model: Any, out: Path, with_tokenizer: bool, max_shard_size: str | None) -> Path:
    from harness.zoo import causal_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if with_tokenizer:
        from transformers import AutoTokenizer

        causal_tokenizer().save_pretrained(out)
        # transformers 5 loads some model types' tokenizers through their own class, which rebuilds the
        # pipeline from vocab and merges (Qwen2Tokenizer: Qwen's split regex, NFC, "<|endoftext|>" added).
        # Saved as loaded, tokenizer.json, AutoTokenizer and llama.cpp's converter see one tokenizer.
        AutoTokenizer.from_pretrained(out).save_pretrained(out)
    return out


def build_arch_checkpoint(
    arch: str,
    out: Path,
    *,
    vocab_size: int = VOCAB_SIZE,
    with_tokenizer: bool = True,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """Write a seeded small `arch` checkpoint (one of ARCHS) to `out` and return `out`."""
    import torch

    config = arch_config(arch, vocab_size=vocab_size, **config_overrides)
    torch.manual_seed(SEED)
    model = _model_class(arch).from_config(config, dtype=getattr(torch, dtype))
    return _save(model.eval(), Path(out), with_tokenizer, max_shard_size)


def build_large_vocab_llama(
    out: Path, *, vocab_size: int = LARGE_VOCAB_SIZE, hidden_size: int = 64, dtype: str = "float32"
) -> Path:
    """A small Llama with Llama 3's 128,256-token vocabulary: a small checkpoint (~66 MB fp32,
    untied) whose logits are tokens x 128k, for the memory of the chunked quality pass."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=2048)  # fmt: skip
    torch.manual_seed(SEED)
    model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    return _save(model.eval(), Path(out), True, None)


def qwen_05b_config():
    """Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads / 2 KV heads, vocab 151,936, tied."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32_768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.02,
        **SPECIAL_IDS,
    )


def build_qwen_05b_shape(out: Path, *, max_shard_size: str = "400MB") -> Path:
    """A Qwen2-shaped 0.5B model (494M params) with random weights, saved as bf16 in 3 shards.

    Built directly in bf16 (one ~1 GB copy in RAM, no fp32 intermediate); writes ~1 GB.
    For benchmarks, not for unit tests.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM._from_config(qwen_05b_config(), dtype=torch.bfloat16)
    return _save(model.eval(), Path(out), True, max_shard_size)
