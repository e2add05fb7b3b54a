"""TensorFlow through Keras 3 and KerasHub (KERAS_BACKEND=tensorflow), from the same local
Hugging Face-format checkpoints the PyTorch backend loads.

Loading, precisions, byte counting and the cached greedy decode are Keras-generic and live in
`harness.backends.keras_common`; this module adds what is TensorFlow's own: thread pools and GPU
memory growth, `tf.device` placement, `tf.function` compilation of the prefill and the decode step
(one trace for every shape), device synchronization and the allocator's memory statistics.

Importing this module imports TensorFlow. It must never share a process with torch: the launcher
runs TensorFlow workers under spawn, and the backend refuses to start where torch is already imported.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # never preallocate a whole GPU

import tensorflow as tf

from harness.backends.keras_common import CompiledPrefill, CompiledStep, KerasBackend


def configure_tensorflow(device: str) -> dict[str, str]:
    """Thread pools sized to the CPUs this process may use, and memory growth on every GPU.

    Must run before TensorFlow's runtime starts (before the first op or variable). A GPU that
    cannot be switched to memory growth would be preallocated whole, so that raises.
    """
    notes: dict[str, str] = {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
        notes["threads"] = f"intra_op={cpus} inter_op={cpus}"
    except RuntimeError as exc:  # the runtime already started: keep its pools
        notes["threads"] = f"not set ({exc})"
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:
            if not tf.config.experimental.get_memory_growth(gpu):
                raise RuntimeError(f"cannot enable memory growth on {gpu.name}: {exc}") from exc
    if device.startswith("cuda") and not tf.config.list_physical_devices("GPU"):
        raise RuntimeError(
            "this TensorFlow sees no GPU (tensorflow-cpu, or a CUDA mismatch): install tensorflow[and-cuda]"
        )
    return notes


def tf_device(device: str) -> str:
    """cpu -> /CPU:0, cuda / cuda:N -> /GPU:N."""
    if device == "cpu":
        return "/CPU:0"
    if device.startswith("cuda"):
        return f"/GPU:{int(device.partition(':')[2] or 0)}"
    raise ValueError(f"TensorFlow runs on cpu and cuda devices, not {device}")


def _dynamic_spec(tensor: Any) -> tf.TensorSpec:
    return tf.TensorSpec([None] * len(tensor.shape), tensor.dtype)


class TensorFlowBackend(KerasBackend):
    """KerasHub on TensorFlow: eager forwards, `tf.function`-compiled cached decode steps."""

    framework = "tensorflow"
    keras_backend = "tensorflow"
    foreign_modules = ("torch",)

    def _configure(self, device: str) -> dict[str, str]:
        self.device = tf_device(device)
        return configure_tensorflow(device)

    def _device_scope(self) -> contextlib.AbstractContextManager[Any]:
        return tf.device(self.device)

    def _start_device(self) -> bool:
        tf.config.list_logical_devices()  # initializes the eager context: every visible device
        with tf.device(self.device):
            tf.zeros(1).numpy()
        return self.device.startswith("/GPU")

    def _gpu_compute_capability(self) -> tuple[int, int]:
        gpus = tf.config.list_physical_devices("GPU")
        index = int(self.spec.device.partition(":")[2] or 0)
        details = tf.config.experimental.get_device_details(gpus[index]) if index < len(gpus) else {}
        major, minor = details.get("compute_capability", (0, 0))
        return int(major), int(minor)

    def _compile_prefill(self, prefill: CompiledPrefill) -> CompiledPrefill:
        cache_spec = tf.nest.map_structure(_dynamic_spec, self._empty_cache(1, 1))
        ids_spec = tf.TensorSpec([None, None], tf.int32)
        # One trace serves every batch and prompt length (shapes are left dynamic).
        return tf.function(prefill, input_signature=[ids_spec, cache_spec])

    def _compile_step(self, step: CompiledStep) -> CompiledStep:
        cache_spec = tf.nest.map_structure(_dynamic_spec, self._empty_cache(1, 1))
        ids_spec, index_spec = tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([], tf.int32)
        # One trace serves every batch, cache length and step.
        return tf.function(step, input_signature=[ids_spec, cache_spec, index_spec])

    def synchronize(self) -> None:
        if self.device.startswith("/GPU"):
            tf.test.experimental.sync_devices()

    # --- device memory --------------------------------------------------------------------

    def _gpu_name(self) -> str | None:
        return self.device.removeprefix("/") if self.device.startswith("/GPU") else None

    def reset_device_peaks(self) -> None:
        if self._gpu_name():
            tf.config.experimental.reset_memory_stats(self._gpu_name())

    def device_memory(self) -> dict[str, int | None]:
        gpu = self._gpu_name()
        if gpu is None:
            return {}
        from harness.measure.trackers import nvml_process_bytes

        info = tf.config.experimental.get_memory_info(gpu)
        return {
            "peak_device_allocated_bytes": info["peak"],
            "peak_device_reserved_bytes": None,  # TensorFlow's BFC allocator does not report its pool
            "device_process_bytes": nvml_process_bytes(int(gpu.partition(":")[2] or 0)),
        }

    def limit_device_memory(self, limit_bytes: int) -> None:
        """Cap TensorFlow's allocator on the GPU at `limit_bytes`: one logical device with that
        memory limit (allocations beyond it raise ResourceExhaustedError; it still grows on
        demand, TF_FORCE_GPU_ALLOW_GROWTH). Must run before the runtime starts (before prepare).
        A no-op on CPU, where the host memory limit applies."""
        gpu = self._gpu_name()
        if gpu is None:
            return
        physical = tf.config.list_physical_devices("GPU")[int(gpu.partition(":")[2] or 0)]
        limit_mb = max(1, limit_bytes >> 20)
        tf.config.set_logical_device_configuration(physical, [tf.config.LogicalDeviceConfiguration(limit_mb)])

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        """Device copy bandwidth: median of timed passes that read one array and write another
        into a variable (bytes read + written). A plain `dst.assign(src)` only shares the
        buffer on CPU (it measured 11,800 GB/s here): the `+ 1` makes the write real."""
        from harness.measure.trackers import copy_bandwidth_bytes_s

        with tf.device(self.device):
            src = tf.ones(size_bytes // 4, dtype=tf.float32)
            dst = tf.Variable(tf.zeros_like(src))
            copy = tf.function(lambda: dst.assign(src + 1.0))
            return copy_bandwidth_bytes_s(copy, self.synchronize, size_bytes)
