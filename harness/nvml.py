"""NVML in one place: a session that initializes it and always shuts it down.

    with nvml_session() as nvml:
        if nvml is None:
            ...  # no pynvml, or no driver / no GPU: NVML is unavailable
        else:
            nvml.nvmlDeviceGetCount()

The session yields the pynvml module, or None where pynvml is not installed or nvmlInit fails.
A failing nvmlShutdown is ignored. Errors of the calls made inside the session are the caller's
(each catches `nvml.NVMLError` where it needs to). Importing this module imports no pynvml.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def nvml_session() -> Iterator[Any]:
    """NVML initialized for the body; yields the pynvml module, or None when NVML is unavailable."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            pynvml = None
    if pynvml is None:
        yield None
        return
    try:
        yield pynvml
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
