"""Backends: how each framework loads and runs a model. One module per framework."""

from __future__ import annotations

from harness.backends.base import Backend, LoadSpec, WeightStats

__all__ = ["Backend", "LoadSpec", "WeightStats", "backend_for"]


def backend_for(framework: str, spec: LoadSpec) -> Backend:
    """The backend for `framework`; imports its stack only here, inside the worker."""
    if framework == "pytorch":
        from harness.backends.pytorch import PyTorchBackend

        return PyTorchBackend(spec)
    if framework == "tensorflow":
        from harness.backends.tensorflow import TensorFlowBackend

        return TensorFlowBackend(spec)
    raise ValueError(f"no backend for framework {framework!r}")
