"""JAX through Keras 3 and KerasHub (KERAS_BACKEND=jax): the same loader, precisions and decode
loop as the TensorFlow backend (`harness.backends.keras_common`), on JAX arrays.

What is JAX's own: no preallocation of a whole GPU (XLA_PYTHON_CLIENT_PREALLOCATE=false, the
counterpart of TensorFlow's memory growth), `jax.default_device` placement, `jax.jit` of the
prefill and the decode step over the model's variables as arguments (KerasHub's own generate does
the same, through `keras.StatelessScope`), and synchronization by blocking on what was last
dispatched (JAX dispatches asynchronously, on CPU too). jit specializes on shapes: each new
(batch, prompt length) compiles the prefill once and each new (batch, cache length) the step once,
which the untimed warm-up of every throughput point pays.

This worker must share its process with neither torch nor TensorFlow. KerasHub 0.32
imports TensorFlow whenever it is installed, whatever KERAS_BACKEND says
(keras_hub/src/utils/tensor_utils.py: `tf = try_import_tensorflow()`, for its tf.data and
tensorflow-text preprocessing layers, which this harness never uses: it loads with
preprocessor=None and tokenizes without Keras). So this module marks `tensorflow` as absent in
`sys.modules` before Keras is imported: KerasHub's guarded import then takes its "no TensorFlow"
path, and anything else that tries to import it in this worker fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # never preallocate a whole GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA logs through the same absl/TSL logger
if "tensorflow" not in sys.modules:
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # `import tensorflow` now raises ImportError

import jax
import numpy as np

from harness.backends.keras_common import CompiledPrefill, CompiledStep, KerasBackend

MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def jax_device(device: str) -> jax.Device:
    """cpu -> the first CPU device, cuda / cuda:N -> the N-th GPU device."""
    if device == "cpu":
        return jax.devices("cpu")[0]
    if device.startswith("cuda"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError as exc:
            raise RuntimeError(f"this jax sees no GPU ({exc}): pip install 'jax[cuda12]'") from exc
        index = int(device.partition(":")[2] or 0)
        if index >= len(gpus):
            raise RuntimeError(f"{device}: jax sees {len(gpus)} GPU(s)")
        return gpus[index]
    raise ValueError(f"JAX runs on cpu and cuda devices, not {device}")


class JaxBackend(KerasBackend):
    """KerasHub on JAX: eager forwards, `jax.jit`-compiled cached decode steps."""

    framework = "jax"
    keras_backend = "jax"
    foreign_modules = ("torch", "tensorflow")

    def _configure(self, device: str) -> dict[str, str]:
        self._device_kind = device
        self.device: jax.Device | None = None  # resolved in prepare(): resolving starts JAX's runtime
        self._pending: Any = None
        self._peak_at_reset: int | None = None
        return {"jax": jax.__version__}

    def _target(self) -> jax.Device:
        if self.device is None:
            self.device = jax_device(self._device_kind)
        return self.device

    def _device_scope(self) -> contextlib.AbstractContextManager[Any]:
        return jax.default_device(self._target())

    def _start_device(self) -> bool:
        device = self._target()
        self.notes["device"] = f"{device.platform}:{device.id} ({device.device_kind})"
        # One tiny jitted op: imports and starts XLA's compiler pipeline (MLIR), which the load's
        # first compilation would otherwise pay inside load_s.
        self._landed(jax.jit(lambda x: x + 1)(jax.device_put(np.zeros(1, np.float32), device)))
        return device.platform == "gpu"

    def _gpu_compute_capability(self) -> tuple[int, int]:
        major, _, minor = str(getattr(self._target(), "compute_capability", "0.0")).partition(".")
        return int(major), int(minor or 0)

    def _state(self) -> list[Any]:
        """The model's variable values, passed to jitted functions as arguments (not baked in as constants)."""
        return [v.value for v in self.model.variables]

    def _with_state(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function(*args)` as `(state, *args)`, every Keras variable read from `state` (KerasHub's
        own jitted generate does the same)."""
        import keras

        variables = self.model.variables

        def stateless(state: list[Any], *args: Any) -> Any:
            with keras.StatelessScope(state_mapping=list(zip(variables, state, strict=True))):
                return function(*args)

        return stateless

    def _stateless(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function` jitted over the model's variables; one compilation per input shape."""
        jitted, state = jax.jit(self._with_state(function)), self._state()
        return lambda *args: jitted(state, *args)

    def _cache_shapes(self, length: int) -> Any:
        """Shapes and dtypes only (`jax.eval_shape`): no op runs and nothing compiles."""
        build = self._with_state(lambda token_ids: self.model._build_cache(token_ids)[1])
        return jax.eval_shape(build, self._state(), jax.ShapeDtypeStruct((1, length), np.int32))

    def _compile_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """Jitted too: faster than JAX's op-by-op eager mode even on the first call, and the quality
        pass's chunks all have one shape."""
        return self._stateless(forward)

    def _compile_prefill(self, prefill: CompiledPrefill) -> CompiledPrefill:
        return self._stateless(prefill)

    def _compile_step(self, step: CompiledStep) -> CompiledStep:
        return self._stateless(step)

    def _landed(self, outputs: Any) -> None:
        self._pending = outputs

    def synchronize(self) -> None:
        """Wait for everything dispatched since the last wait (JAX's dispatch is asynchronous)."""
        if self._pending is not None:
            jax.block_until_ready(self._pending)
            self._pending = None

    # --- device memory --------------------------------------------------------------------

    def _gpu_stats(self) -> dict[str, int] | None:
        if not self.on_gpu or self.device is None:
            return None
        return self.device.memory_stats() or None

    def reset_device_peaks(self) -> None:
        """JAX cannot reset its allocator's peak: remember it, so a phase can tell whether it set a new one."""
        stats = self._gpu_stats()
        self._peak_at_reset = stats.get("peak_bytes_in_use") if stats else None

    def device_memory(self) -> dict[str, int | None]:
        """The allocator's peak since the last reset_device_peaks() where this span raised the
        process's peak (then it is exact); None where it did not (the span's own peak is then
        below an earlier one and JAX does not say by how much)."""
        stats = self._gpu_stats()
        if stats is None:
            return {}
        from harness.measure.trackers import nvml_process_bytes

        peak = stats.get("peak_bytes_in_use")
        raised = peak is not None and (self._peak_at_reset is None or peak > self._peak_at_reset)
        return {
            "peak_device_allocated_bytes": peak if raised else None,
            "peak_device_reserved_bytes": stats.get("peak_pool_bytes") or stats.get("bytes_reserved"),
            "device_process_bytes": nvml_process_bytes(self._target().id),
        }

    def limit_device_memory(self, limit_bytes: int) -> None:
        """Cap XLA's GPU allocator at `limit_bytes`, as a fraction of the GPU's memory (NVML's
        total) in XLA_PYTHON_CLIENT_MEM_FRACTION; it still grows on demand (no preallocation).
        Must run before JAX's runtime starts (before prepare). A no-op on CPU."""
        if not self.on_gpu:
            return
        if self.device is not None:
            raise RuntimeError("JAX's runtime already started: its GPU memory can no longer be capped")
        from harness.environment import probe_gpus

        index = int(self._device_kind.partition(":")[2] or 0)
        gpus = probe_gpus()[0]
        if index >= len(gpus):
            raise RuntimeError(f"NVML does not list {self._device_kind}: cannot cap its memory")
        os.environ[MEMORY_FRACTION_ENV] = f"{min(1.0, limit_bytes / gpus[index].memory_bytes):.6f}"

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        """Device copy bandwidth: median of timed passes that read an array and write it back in
        place (its buffer donated to the jitted update, so no allocation is timed; bytes read + written)."""
        from harness.measure.trackers import copy_bandwidth_bytes_s

        update = jax.jit(lambda x: x + 1.0, donate_argnums=0)
        buffer = [jax.device_put(np.zeros(size_bytes // 4, np.float32), self._target())]

        def run() -> None:
            buffer[0] = update(buffer[0])
            self._landed(buffer[0])

        return copy_bandwidth_bytes_s(run, self.synchronize, size_bytes)
