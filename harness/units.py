"""Byte units and how sizes are printed: one place for the constants and the format."""

from __future__ import annotations

import math

MIB = 1 << 20
GIB = 1 << 30


def human_bytes(n: float | None) -> str:
    """`1.5 GiB` from 1 GiB up, else `12.3 MiB`; `-` for a missing value (None or NaN)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"
