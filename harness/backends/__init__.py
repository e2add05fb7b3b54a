"""Backends: how each framework loads and runs a model. One module per framework, named in the registry."""

from __future__ import annotations

import os

from harness.backends.base import Backend, LoadSpec, WeightStats
from harness.registry import FRAMEWORKS, load_object

__all__ = ["Backend", "LoadSpec", "WeightStats", "backend_for"]


def backend_for(framework: str, spec: LoadSpec) -> Backend:
    """The registry's backend for `framework`; imports its stack only here, inside the worker."""
    descriptor = FRAMEWORKS[framework]
    os.environ.update(descriptor.env)  # e.g. KERAS_BACKEND, before the backend module imports Keras
    return load_object(descriptor.backend)(spec)
