"""What the zoo's builders (harness.zoo), its training recipe (harness.zoo.training) and the extra
architectures (harness.zoo.archs) share: the tokenizer's vocabulary and special tokens, the seed, and
the tiny Llama's config. Declared once here, so neither zoo module imports the other for them."""

from __future__ import annotations

VOCAB_SIZE = 1024
SEED = 1234
# The zoo tokenizer's special tokens; its BPE trainer gives them the first ids, in this order.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_IDS = dict(
    pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),  # 0
    bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),  # 1
    eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),  # 2
)


def tiny_llama_config(**overrides):
    """Llama with grouped-query attention (8 heads, 2 KV heads) and untied embeddings."""
    from transformers import LlamaConfig

    args = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.1,
        **SPECIAL_IDS,
    )
    args.update(overrides)
    return LlamaConfig(**args)
