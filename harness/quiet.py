"""Imported first by every forkserver preload: silences library log lines that say nothing about a
measurement (torchao's optional CUDA kernels failing to load on CPU builds, a torch deprecation
warning torchao triggers, bitsandbytes' optional hub kernel). Each worker's own output goes to its log file; this is the forkserver's,
which would otherwise print into the user's terminal."""

from __future__ import annotations

import logging

# bitsandbytes on AVX512-BF16 CPUs tries to fetch a 4-bit kernel from the Hugging Face hub
# (kernels-community) at import and warns when it cannot; its own kernel then runs.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")

for _name in QUIET_LOGGERS:
    logging.getLogger(_name).setLevel(logging.ERROR)
