"""The sizes of what a worker runs: read by the measuring code that runs it and by the memory plan
that predicts it, so the two cannot drift apart. Nothing here imports a framework."""

from __future__ import annotations

FIRST_FORWARD_TOKENS = 16  # the forward right after a load (first_forward_s), inside the load's peak
CHUNK_TOKENS = 256  # tokens per forward of the quality pass: its logits are CHUNK_TOKENS x vocab x 4 bytes
COMPARE_BLOCK_TOKENS = 32  # rows per float64 block of the quality comparison
ENCODER_SENTENCES = 32  # an encoder's quality pass: this many sentences of the eval text
ENCODER_MAX_TOKENS = 64  # ... each cut to this many tokens
ENCODER_BATCH = 8  # ... embedded this many at a time
