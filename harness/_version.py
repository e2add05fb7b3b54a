"""The harness version: read by the package, the environment fingerprint and the build (pyproject)."""

__version__ = "0.1.0"
