"""The recipe for `tiny-llama-trained`: a small Llama trained here, offline, deterministically.

Training text: docstrings of the standard library minus the evaluation modules
(harness.corpus.training_text). Fixed step count, fixed seed, single data order: the same
machine and thread count give the same weights. It takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import math

TRAIN_STEPS = 250
BATCH_SIZE = 16
SEQ_LEN = 64
PEAK_LR = 3e-3
WARMUP_STEPS = 20


# tiny-llama-trained: hidden 192, GQA 6/2 heads, MLP 512 (2.2M parameters)
TINY_LLAMA_SHAPE = {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 6, "num_key_value_heads": 2}
# tiny-llama-trained-256: every weight row a multiple of 256, so llama.cpp's k-quants apply to all
# tensors instead of falling back to 32-element block types (head dim 32, GQA 8/2 heads)
K_QUANT_SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 2}


def train_tiny_llama(tokenizer, seed: int, steps: int = TRAIN_STEPS, shape: dict | None = None):
    """Train a small Llama (4 layers, `shape`: TINY_LLAMA_SHAPE unless given) on the training text for
    `steps` AdamW steps (the zoo recipe: TRAIN_STEPS; fewer only in tests, the schedule shrinks with them)."""
    import torch
    from transformers import LlamaForCausalLM

    from harness.corpus import training_text
    from harness.zoo.config import tiny_llama_config

    torch.manual_seed(seed)
    config = tiny_llama_config(**(shape or TINY_LLAMA_SHAPE), initializer_range=0.02)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(training_text())["input_ids"], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < WARMUP_STEPS:
            return PEAK_LR * (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(steps - WARMUP_STEPS, 1)
        return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    model.config.harness_training = {
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "peak_lr": PEAK_LR,
        "final_loss": round(loss.item(), 4),
        "train_tokens": len(ids),
    }
    return model
