"""Errors the user can fix, and turning any exception into one readable line."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input found before anything runs. The message is one line that names the fix."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of message [notes]`, trimmed, for records and console output (PEP 678 notes,
    e.g. the training phase an error happened in, come last)."""
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    notes = [n.strip() for n in getattr(exc, "__notes__", ()) if n.strip()]
    if notes:
        line += f" [{'; '.join(notes)}]"
    return line if len(line) <= limit else line[: limit - 3] + "..."
