"""harness: load-time, memory, throughput and quality benchmarks for language models."""

from __future__ import annotations

from harness._version import __version__

__all__ = ["__version__", "load_results"]


def load_results(path):
    """Read a run dir (or its results.jsonl) into a pandas DataFrame, one row per combination."""
    from harness.storage import load_results as _load_results

    return _load_results(path)
