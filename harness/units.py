"""Byte units and how sizes are printed: one place for the constants, the labels and the format.

One convention for every size the harness prints (reports, console tables, plans, README): binary
units, 1 MiB = 2**20 bytes and 1 GiB = 2**30 bytes, labelled MiB and GiB; never MB or GB, which are
10**6 and 10**9 bytes. Record fields stay in bytes (`_bytes`); rates in bytes per second.
"""

from __future__ import annotations

import math

MIB = 1 << 20
GIB = 1 << 30
MIB_LABEL = "MiB"  # the unit of size columns, e.g. `weight MiB`
UNITS_NOTE = "Sizes in binary units: 1 MiB = 2^20 bytes, 1 GiB = 2^30 bytes."


def human_bytes(n: float | None) -> str:
    """`1.5 GiB` from 1 GiB up, else `12.3 MiB`; `-` for a missing value (None or NaN)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"
