"""TensorFlow through Keras 3 and KerasHub (KERAS_BACKEND=tensorflow), from the same local
Hugging Face-format checkpoints the PyTorch backend loads.

fp32/fp16/bf16 are Keras dtype policies; keras-int8 and keras-int4 are `model.quantize()` on a
float model (int8: per-channel weights with per-token dynamic activation quantization, an int8
matmul; int4: weights only, packed two per byte, groups of 128 with zero points). Generation is
greedy over KerasHub's own KV cache (`call_with_cache`), one compiled step per token. The prefill
fills the cache over the prompt and computes the logits of the last position only, the same work
as PyTorch's prefill with `logits_to_keep=1`.

Importing this module imports TensorFlow, Keras and KerasHub. It must never share a process
with torch: the launcher runs TensorFlow workers under spawn, and the backend refuses to start
where torch is already imported.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # never preallocate a whole GPU

import numpy as np
import tensorflow as tf

from harness.backends.base import LoadSpec, WeightStats
from harness.backends.keras_support import CAVEATS, keras_class_name, tensorflow_unsupported_reason

FLOAT_POLICIES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KERAS_QUANT_MODES = {"keras-int8": "int8", "keras-int4": "int4"}
# What load() would otherwise import on first use (Keras, KerasHub, its Hugging Face converters,
# safetensors, the harness helpers it calls), imported by prepare() before the load timer starts.
LOADER_MODULES = ("keras", "keras_hub", "safetensors", "harness.models", "harness.environment")
# KerasHub imports its converters (all of them, ~40 modules) inside the first from_preset of a
# Hugging Face directory; a private path, so its absence in another version is not an error.
LOADER_PRIVATE_MODULES = ("keras_hub.src.utils.transformers.preset_loader",)
QUANT_NOTES = {
    "int8": "Keras int8: per-output-channel int8 weights, per-token dynamic int8 activations, int8 matmul",
    "int4": "Keras int4: int4 weights packed two per int8 byte, groups of 128 with zero points; float matmul",
}


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


def runs_bf16_well(device: str) -> bool:
    """bf16 is native on Ampere+ GPUs and on CPUs with AVX512-BF16 or AMX."""
    if device.startswith("cuda"):
        gpus = tf.config.list_physical_devices("GPU")
        index = int(device.partition(":")[2] or 0)
        details = tf.config.experimental.get_device_details(gpus[index]) if index < len(gpus) else {}
        return tuple(details.get("compute_capability", (0, 0))) >= (8, 0)
    from harness.environment import cpu_info, cpu_runs_bf16_well

    return cpu_runs_bf16_well(cpu_info()[1])


def safetensors_keys(source: Path) -> set[str]:
    """Tensor names in a local checkpoint, read from the safetensors headers (or the index)."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    keys: set[str] = set()
    for file in source.glob("*.safetensors"):
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            keys |= set(json.loads(handle.read(length))) - {"__metadata__"}
    return keys


def _numel(shape: Any) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


class TensorFlowBackend:
    """Loads with KerasHub's `from_preset` and runs eagerly, with compiled cached decode steps."""

    framework = "tensorflow"
    prefill_logits = "last"  # the timed prefill computes the logits of the last prompt position only

    def __init__(self, spec: LoadSpec) -> None:
        if "torch" in sys.modules:
            raise RuntimeError("torch is imported in this TensorFlow worker: the two must not share a process")
        self.spec = spec
        self.notes = configure_tensorflow(spec.device)
        self.device = tf_device(spec.device)
        self.model: Any = None
        self.config: dict[str, Any] = {}
        self.float_policy: str | None = None
        self.quant_mode: str | None = None
        self._float_numel: dict[str, int] = {}  # variable path -> size before quantization
        self._cache_layout: list[tuple[tuple[int, ...], int | None, Any]] | None = None
        self._cache_structure: Any = None
        self._step: Callable[..., Any] | None = None
        self._prefill: Callable[..., Any] | None = None

    # --- loading --------------------------------------------------------------------------

    def prepare(self) -> dict[str, float | None]:
        """Everything before `load_s`: import the libraries load() would import on first use
        (`quantizer_import_s`), then start TensorFlow's runtime on the device, which creates the
        CUDA context on a GPU (`device_init_s`; None on CPU, where there is no device context)."""
        started = time.perf_counter()
        for name in LOADER_MODULES:
            importlib.import_module(name)
        for name in LOADER_PRIVATE_MODULES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        if not Path(self.spec.source).is_dir():
            importlib.import_module("huggingface_hub")
        imported = time.perf_counter()
        tf.config.list_logical_devices()  # initializes the eager context: every visible device
        with tf.device(self.device):
            tf.zeros(1).numpy()
        self.synchronize()
        ready = time.perf_counter()
        return {
            "quantizer_import_s": imported - started,
            "device_init_s": ready - imported if self.device.startswith("/GPU") else None,
        }

    def _policies(self) -> tuple[str, str | None]:
        precision = self.spec.precision
        if precision in FLOAT_POLICIES:
            return FLOAT_POLICIES[precision], None
        if precision in KERAS_QUANT_MODES:
            return ("bfloat16" if runs_bf16_well(self.spec.device) else "float32"), KERAS_QUANT_MODES[precision]
        raise ValueError(
            f"precision {precision} is not a TensorFlow precision: use fp32, fp16, bf16, keras-int8, keras-int4"
        )

    def _preset(self) -> str:
        path = Path(self.spec.source)
        if path.is_dir():
            from harness.models import check_safetensors_files

            check_safetensors_files(str(path))
            self.config = json.loads((path / "config.json").read_text())
            return str(path)
        from huggingface_hub import hf_hub_download

        self.config = json.loads(Path(hf_hub_download(self.spec.source, "config.json")).read_text())
        return f"hf://{self.spec.source}"

    def load(self) -> None:
        import keras
        import keras_hub

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"Keras runs on {keras.backend.backend()}, not tensorflow: unset KERAS_BACKEND")
        self.float_policy, self.quant_mode = self._policies()
        preset = self._preset()
        model_type, kind = self.config.get("model_type"), self.spec.kind
        class_name = keras_class_name(model_type, kind)
        if class_name is None:
            raise ValueError(tensorflow_unsupported_reason(model_type, kind))
        if (
            model_type == "bert"
            and Path(preset).is_dir()
            and not any("pooler.dense" in k for k in safetensors_keys(Path(preset)))
        ):
            raise ValueError(f"{self.spec.source} has no pooler weights: {CAVEATS['bert']}")
        model_class = getattr(keras_hub.models, class_name)
        with tf.device(self.device):
            if kind == "causal-lm":
                model = model_class.from_preset(preset, preprocessor=None, dtype=self.float_policy)
            else:
                model = model_class.from_preset(preset, dtype=self.float_policy)
            model.trainable = False
            if self.quant_mode:
                self._float_numel = {v.path: _numel(v.shape) for v in self._variables(model)}
                model.quantize(self.quant_mode)
        self.model = model
        if "torch" in sys.modules:
            raise RuntimeError("loading the TensorFlow model imported torch: the two must not share a process")

    def synchronize(self) -> None:
        if self.device.startswith("/GPU"):
            tf.test.experimental.sync_devices()

    # --- size -----------------------------------------------------------------------------

    @staticmethod
    def _variables(model: Any) -> list[Any]:
        """Every weight (trainable or not, quantization scales and zero points included), each
        once; dropout seed-generator states are RNG state, not weights, and are left out."""
        seen: dict[int, Any] = {}
        for variable in model.weights:
            seen.setdefault(id(variable), variable)
        return list(seen.values())

    def weight_stats(self) -> WeightStats:
        variables = self._variables(self.model)
        sizes = {v.path: _numel(v.shape) * tf.as_dtype(v.dtype).size for v in variables}
        total_bytes = sum(sizes.values())
        notes = dict(self.notes)
        if not self.quant_mode:
            dtype = self.model.dtype_policy.name
            return WeightStats(
                weight_bytes=total_bytes,
                param_count=sum(_numel(v.shape) for v in variables),
                storage_dtype=dtype,
                compute_dtype=self.model.compute_dtype,
                architecture=type(self.model).__name__,
                notes=notes,
            )
        # Quantized: count parameters as the float model had them (int4 packs two per byte);
        # variables that appeared with quantization (scales, zero points, g_idx) are quant state.
        quant_state = sum(size for path, size in sizes.items() if path not in self._float_numel)
        quantized = {v.path for v in variables if v.path in self._float_numel and "int" in str(v.dtype)}
        total_params = sum(self._float_numel.values())
        layers = {id(layer) for layer in self.model._flatten_layers() if layer.dtype_policy.quantization_mode}
        notes["quantization"] = QUANT_NOTES[self.quant_mode]
        notes["quantized_layers"] = "Dense, EinsumDense and (Reversible)Embedding; norms and biases stay float"
        return WeightStats(
            weight_bytes=total_bytes,
            param_count=total_params,
            quant_state_bytes=quant_state,
            quantized_modules=len(layers),
            quantized_param_frac=sum(self._float_numel[p] for p in quantized) / total_params if total_params else 0.0,
            storage_dtype=self.quant_mode,
            compute_dtype=self.model.compute_dtype,
            architecture=type(self.model).__name__,
            notes=notes,
        )

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
        from harness.trackers import nvml_process_bytes

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

    # --- running --------------------------------------------------------------------------

    @staticmethod
    def _ids(array: np.ndarray) -> tf.Tensor:
        return tf.convert_to_tensor(np.ascontiguousarray(array), dtype=tf.int32)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            ids = self._ids(input_ids)
            out = self.model({"token_ids": ids, "padding_mask": tf.ones_like(ids)}, training=False)
            return tf.cast(out, tf.float32).numpy()

    def _step_fn(self) -> Callable[..., Any]:
        """A compiled `call_with_cache` step returning the greedy next token of each row."""
        if self._step is None:
            model = self.model

            def step(token_ids: tf.Tensor, cache: Any, index: tf.Tensor) -> tuple[tf.Tensor, Any]:
                logits, _, cache = model.call_with_cache(token_ids, cache, index)
                return tf.argmax(logits[:, -1, :], axis=-1, output_type=tf.int32)[:, None], cache

            cache_spec = tf.nest.map_structure(
                lambda t: tf.TensorSpec([None] * len(t.shape), t.dtype), self._empty_cache(1, 1)
            )
            ids_spec, index_spec = tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([], tf.int32)
            # One trace serves every batch, prompt length and step (shapes are left dynamic).
            self._step = tf.function(step, input_signature=[ids_spec, cache_spec, index_spec])
        return self._step

    def _empty_cache(self, batch: int, length: int) -> Any:
        """Zeros shaped like the model's own cache for `length` positions, found by probing
        `_build_cache` at two lengths (the axis that grows is the sequence axis)."""
        if self._cache_layout is None:
            one = self.model._build_cache(tf.zeros((1, 1), tf.int32))[1]
            two = self.model._build_cache(tf.zeros((1, 2), tf.int32))[1]
            layout = []
            for a, b in zip(tf.nest.flatten(one), tf.nest.flatten(two), strict=True):
                axes = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
                layout.append((tuple(int(d) for d in a.shape), axes[0] if axes else None, a.dtype))
            self._cache_layout, self._cache_structure = layout, one
        tensors = []
        for shape, axis, dtype in self._cache_layout:
            full = [batch, *shape[1:]]
            if axis is not None:
                full[axis] = length
            tensors.append(tf.zeros(full, dtype))
        return tf.nest.pack_sequence_as(self._cache_structure, tensors)

    def _prefill_fn(self) -> Callable[..., Any]:
        """A compiled prefill: (prompt ids, empty cache) -> (logits of the last position, filled cache).

        KerasHub's `call_with_cache` has no logits_to_keep; its logits over every position feed no
        output here, so TensorFlow prunes them from the graph when it runs the function, and the
        head (`token_embedding(reverse=True)`, soft cap included, after the final norm that
        `hidden_states` already holds, in every class of keras_support) runs on the last position.
        """
        if self._prefill is None:
            model = self.model

            def prefill(token_ids: tf.Tensor, cache: Any) -> tuple[tf.Tensor, Any]:
                _, hidden_states, cache = model.call_with_cache(token_ids, cache, 0)
                logits = model.backbone.token_embedding(hidden_states[:, -1:, :], reverse=True)
                return logits[:, -1, :], cache

            cache_spec = tf.nest.map_structure(
                lambda t: tf.TensorSpec([None] * len(t.shape), t.dtype), self._empty_cache(1, 1)
            )
            ids_spec = tf.TensorSpec([None, None], tf.int32)
            self._prefill = tf.function(prefill, input_signature=[ids_spec, cache_spec])
        return self._prefill

    def next_token_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [batch, vocab] of the position after the prompt, from the timed prefill's path."""
        with tf.device(self.device):
            ids = self._ids(input_ids)
            logits, _ = self._prefill_fn()(ids, self._empty_cache(ids.shape[0], ids.shape[1]))
            return tf.cast(logits, tf.float32).numpy()

    def prefill(self, input_ids: np.ndarray) -> None:
        """One forward over the prompt that fills the KV cache and computes the logits of the
        last position only (as PyTorch's logits_to_keep=1)."""
        with tf.device(self.device):
            ids = self._ids(input_ids)
            if self.spec.kind != "causal-lm":
                self.model(self._encoder_inputs(ids, tf.ones_like(ids)), training=False)
                return
            self._prefill_fn()(ids, self._empty_cache(ids.shape[0], ids.shape[1]))

    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        """Greedy: prefill the prompt into the cache, then one cached step per new token."""
        with tf.device(self.device):
            ids = self._ids(input_ids)
            batch, prompt = ids.shape
            cache = self._empty_cache(batch, prompt + new_tokens)
            step = self._step_fn()
            tokens = []
            logits, cache = self._prefill_fn()(ids, cache)
            token = tf.argmax(logits, axis=-1, output_type=tf.int32)[:, None]
            for i in range(new_tokens):
                if i:
                    token, cache = step(token, cache, tf.constant(prompt + i - 1, tf.int32))
                tokens.append(token)
                if on_token:
                    on_token()
            return tf.concat(tokens, axis=1).numpy().astype(np.int64)

    def max_positions(self) -> int | None:
        config = self.config
        from_config = config.get("max_position_embeddings") or config.get("n_positions")
        return from_config or self.model.backbone.get_config().get("max_sequence_length")

    def _backbone(self) -> Any:
        return self.model if self.spec.kind != "causal-lm" else self.model.backbone

    def _encoder_inputs(self, ids: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs = {"token_ids": ids, "padding_mask": mask, "segment_ids": tf.zeros_like(ids)}
        names = self._backbone().input
        return {k: v for k, v in inputs.items() if k in names}

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            ids, mask = self._ids(input_ids), self._ids(attention_mask)
            out = self._backbone()(self._encoder_inputs(ids, mask), training=False)
            hidden = tf.cast(out["sequence_output"] if isinstance(out, dict) else out, tf.float32)
            weights = tf.cast(mask, tf.float32)[..., None]
            pooled = tf.reduce_sum(hidden * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)
            return pooled.numpy()

    def _outputs(self, model: Any, ids: tf.Tensor, mask: tf.Tensor) -> np.ndarray:
        if self.spec.kind == "causal-lm":
            out = model({"token_ids": ids, "padding_mask": mask}, training=False)
        else:
            out = model(self._encoder_inputs(ids, mask), training=False)
            out = out["sequence_output"] if isinstance(out, dict) else out
        return tf.cast(out, tf.float32).numpy()

    def roundtrip_max_abs_diff(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> float:
        """save_to_preset (KerasHub's own format, quantized variables included) to a temp dir,
        from_preset back, and compare one forward's outputs."""
        import tempfile

        with tf.device(self.device):
            ids, mask = self._ids(input_ids), self._ids(attention_mask)
            before = self._outputs(self.model, ids, mask)
            with tempfile.TemporaryDirectory(prefix="harness-roundtrip-") as tmp:
                self.model.save_to_preset(tmp)
                extra: dict[str, Any] = {"preprocessor": None} if self.spec.kind == "causal-lm" else {}
                if not self.quant_mode:  # a saved preset does not carry its float dtype policy back
                    extra["dtype"] = self.float_policy
                try:
                    reloaded = type(self.model).from_preset(tmp, **extra)
                except ValueError as exc:
                    if not self.quant_mode:
                        raise
                    from harness.errors import one_line

                    raise NotImplementedError(
                        f"KerasHub cannot load its own {self.quant_mode} save back: {one_line(exc)}"
                    ) from exc
                after = self._outputs(reloaded, ids, mask)
        return float(np.abs(before - after).max())

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        """Device copy bandwidth into a variable: median of timed copies (bytes read + written)."""
        from harness.trackers import copy_bandwidth_bytes_s

        with tf.device(self.device):
            src = tf.ones(size_bytes // 4, dtype=tf.float32)
            dst = tf.Variable(tf.zeros_like(src))
            return copy_bandwidth_bytes_s(lambda: dst.assign(src), self.synchronize, size_bytes)
