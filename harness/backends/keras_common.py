"""Keras 3 and KerasHub, whatever runs underneath: what the TensorFlow and JAX backends share.

Both load the same local Hugging Face-format checkpoints with KerasHub's `from_preset`. fp32/fp16/bf16
are Keras dtype policies; keras-int8 and keras-int4 are `model.quantize()` on a float model (int8:
per-channel weights with per-token dynamic activation quantization, an int8 matmul; int4: weights
only, packed two per byte, groups of 128 with zero points). Generation is greedy over KerasHub's
own KV cache (`call_with_cache`), one compiled step per token. The prefill fills the cache over
the prompt and computes the logits of the last position only, the same work as PyTorch's prefill
with `logits_to_keep=1`.

Everything here goes through `keras.ops` and `keras.tree`; a subclass (one per Keras backend)
supplies the device, its scope, the compilation of the two cached functions, synchronization and
the device's memory. This module imports no framework itself: the subclass's module sets
KERAS_BACKEND before anything imports Keras.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harness.backends.base import LoadSpec, WeightStats
from harness.backends.keras_support import CAVEATS, keras_class_name, tensorflow_unsupported_reason

# What load() would otherwise import on first use (Keras, KerasHub, its Hugging Face converters,
# safetensors, the harness helpers it calls), imported by prepare() before the load timer starts.
LOADER_MODULES = ("keras", "keras_hub", "safetensors", "harness.checkpoint", "harness.environment")
# KerasHub imports its converters (all of them, ~40 modules) inside the first from_preset of a
# Hugging Face directory; a private path, so its absence in another version is not an error.
LOADER_PRIVATE_MODULES = ("keras_hub.src.utils.transformers.preset_loader",)
QUANT_NOTES = {
    "int8": "Keras int8: per-output-channel int8 weights, per-token dynamic int8 activations, int8 matmul",
    "int4": "Keras int4: int4 weights packed two per int8 byte, groups of 128 with zero points; float matmul",
}
CompiledPrefill = Callable[[Any, Any], tuple[Any, Any]]  # (token ids, cache) -> (last logits, cache)
CompiledStep = Callable[[Any, Any, Any], tuple[Any, Any]]  # (token ids, cache, index) -> (next token, cache)


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


def numel(shape: Any) -> int:
    """Elements of a shape (an empty shape is one scalar)."""
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a Keras dtype name (bfloat16 and the float8s through ml_dtypes)."""
    import ml_dtypes

    name = str(dtype)
    return np.dtype(getattr(ml_dtypes, name, name)).itemsize


def keras_variables(model: Any) -> list[Any]:
    """Every weight (trainable or not, quantization scales and zero points included), each
    once; dropout seed-generator states are RNG state, not weights, and are left out."""
    seen: dict[int, Any] = {}
    for variable in model.weights:
        seen.setdefault(id(variable), variable)
    return list(seen.values())


class KerasBackend:
    """Loads with KerasHub's `from_preset` and runs eagerly, with compiled cached decode steps.

    Subclasses set `framework`, `keras_backend` and `foreign_modules`, and implement the hooks in
    the section "what each Keras backend supplies" below.
    """

    framework: str
    keras_backend: str  # what keras.backend.backend() must say in this worker
    foreign_modules: tuple[str, ...] = ("torch",)  # frameworks that must never share this worker
    prefill_logits = "last"  # the timed prefill computes the logits of the last prompt position only

    def __init__(self, spec: LoadSpec) -> None:
        self._refuse_foreign_modules("starting")
        self.spec = spec
        self.notes = self._configure(spec.device)
        self.model: Any = None
        self.config: dict[str, Any] = {}
        self.float_policy: str | None = None
        self.quant_mode: str | None = None
        self._float_numel: dict[str, int] = {}  # variable path -> size before quantization
        self._cache_layout: list[tuple[tuple[int, ...], int | None, Any]] | None = None
        self._cache_structure: Any = None
        self._step: CompiledStep | None = None
        self._prefill: CompiledPrefill | None = None
        self._forward: Callable[[Any], Any] | None = None
        self._embed: Callable[[Any, Any], Any] | None = None

    def _refuse_foreign_modules(self, when: str) -> None:
        for name in self.foreign_modules:
            if sys.modules.get(name) is not None:
                raise RuntimeError(
                    f"{name} is imported in this {self.framework} worker ({when}): the two must not share a process"
                )

    # --- what each Keras backend supplies --------------------------------------------------

    def _configure(self, device: str) -> dict[str, str]:
        """Set the framework up for `device` before its runtime starts; returns notes for the record."""
        raise NotImplementedError

    def _device_scope(self) -> contextlib.AbstractContextManager[Any]:
        """Where new arrays and variables are placed (the spec's device)."""
        raise NotImplementedError

    def _start_device(self) -> bool:
        """Start the framework's runtime on the device; True where that is an accelerator (device_init_s)."""
        raise NotImplementedError

    def _gpu_compute_capability(self) -> tuple[int, int]:
        """(major, minor) of the spec's CUDA device."""
        raise NotImplementedError

    def _compile_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """A whole-model forward (logits, embeddings) as this backend runs it: eagerly by default."""
        return forward

    def _compile_prefill(self, prefill: CompiledPrefill) -> CompiledPrefill:
        """`prefill` compiled for any batch and prompt length."""
        raise NotImplementedError

    def _compile_step(self, step: CompiledStep) -> CompiledStep:
        """`step` compiled for any batch and cache length (the index is a runtime value)."""
        raise NotImplementedError

    def _landed(self, outputs: Any) -> None:
        """Outputs of work that may still be queued: what synchronize() waits for. Default: nothing
        (the framework runs ops as they are called, or synchronize() waits for the whole device)."""

    def synchronize(self) -> None:
        raise NotImplementedError

    def reset_device_peaks(self) -> None:
        raise NotImplementedError

    def device_memory(self) -> dict[str, int | None]:
        raise NotImplementedError

    def limit_device_memory(self, limit_bytes: int) -> None:
        raise NotImplementedError

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        raise NotImplementedError

    # --- loading --------------------------------------------------------------------------

    @property
    def on_gpu(self) -> bool:
        return self.spec.device.startswith("cuda")

    def prepare(self) -> dict[str, float | None]:
        """Everything before `load_s`: import the libraries load() would import on first use
        (`quantizer_import_s`), then start the framework's runtime on the device, which creates
        the CUDA context on a GPU (`device_init_s`; None on CPU, where there is no device context)."""
        started = time.perf_counter()
        for name in LOADER_MODULES:
            importlib.import_module(name)
        for name in LOADER_PRIVATE_MODULES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        if not Path(self.spec.source).is_dir():
            importlib.import_module("huggingface_hub")
        imported = time.perf_counter()
        accelerator = self._start_device()
        self.synchronize()
        ready = time.perf_counter()
        return {"quantizer_import_s": imported - started, "device_init_s": ready - imported if accelerator else None}

    def runs_bf16_well(self) -> bool:
        """harness.environment.bf16_native for this backend's device (its own compute capability on a GPU)."""
        from harness.environment import bf16_native, cpu_info, cpu_runs_bf16_well

        if self.on_gpu:
            return bf16_native("cuda", self._gpu_compute_capability(), False)
        return bf16_native("cpu", None, cpu_runs_bf16_well(cpu_info()[1]))

    def _policies(self) -> tuple[str, str | None]:
        """(Keras dtype policy, quantization mode or None) of the spec's precision."""
        from harness.registry import PRECISIONS

        precision = PRECISIONS[self.spec.precision]
        if precision.family == "float":
            return precision.storage_dtype, None
        if precision.family != "keras":
            raise ValueError(f"precision {precision.name} is not a Keras precision")
        return ("bfloat16" if self.runs_bf16_well() else "float32"), precision.options["mode"]

    def _preset(self) -> str:
        path = Path(self.spec.source)
        if path.is_dir():
            from harness.checkpoint import check_safetensors_files

            check_safetensors_files(str(path))
            self.config = json.loads((path / "config.json").read_text())
            return str(path)
        from huggingface_hub import hf_hub_download

        self.config = json.loads(Path(hf_hub_download(self.spec.source, "config.json")).read_text())
        return f"hf://{self.spec.source}"

    def load(self) -> None:
        import keras
        import keras_hub

        if keras.backend.backend() != self.keras_backend:
            raise RuntimeError(
                f"Keras runs on {keras.backend.backend()}, not {self.keras_backend}: "
                "KERAS_BACKEND was set before this backend's module imported Keras"
            )
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
        with self._device_scope():
            if kind == "causal-lm":
                model = model_class.from_preset(preset, preprocessor=None, dtype=self.float_policy)
            else:
                model = model_class.from_preset(preset, dtype=self.float_policy)
            model.trainable = False
            if self.quant_mode:
                self._float_numel = {v.path: numel(v.shape) for v in keras_variables(model)}
                model.quantize(self.quant_mode)
        self.model = model
        self._landed([v.value for v in keras_variables(model)])
        self._refuse_foreign_modules("loading the model imported it")

    # --- size -----------------------------------------------------------------------------

    def weight_stats(self) -> WeightStats:
        variables = keras_variables(self.model)
        sizes = {v.path: numel(v.shape) * dtype_bytes(v.dtype) for v in variables}
        total_bytes = sum(sizes.values())
        notes = dict(self.notes)
        if not self.quant_mode:
            return WeightStats(
                weight_bytes=total_bytes,
                param_count=sum(numel(v.shape) for v in variables),
                storage_dtype=self.model.dtype_policy.name,
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

    # --- running --------------------------------------------------------------------------

    @staticmethod
    def _ids(array: Any) -> Any:
        from keras import ops

        return ops.convert_to_tensor(np.ascontiguousarray(array), dtype="int32")

    @staticmethod
    def _float32_numpy(tensor: Any) -> np.ndarray:
        from keras import ops

        return np.asarray(ops.convert_to_numpy(ops.cast(tensor, "float32")))

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        with self._device_scope():
            return self._float32_numpy(self._forward_fn()(self._ids(input_ids)))

    def _forward_fn(self) -> Callable[[Any], Any]:
        """The causal forward, ids -> logits [batch, tokens, vocab], compiled as the backend compiles forwards."""
        if self._forward is None:
            from keras import ops

            model = self.model

            def forward(token_ids: Any) -> Any:
                return model({"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids)}, training=False)

            self._forward = self._compile_forward(forward)
        return self._forward

    def _step_fn(self) -> CompiledStep:
        """A compiled `call_with_cache` step returning the greedy next token of each row."""
        if self._step is None:
            from keras import ops

            model = self.model

            def step(token_ids: Any, cache: Any, index: Any) -> tuple[Any, Any]:
                logits, _, cache = model.call_with_cache(token_ids, cache, index)
                return ops.cast(ops.argmax(logits[:, -1, :], axis=-1), "int32")[:, None], cache

            self._step = self._compile_step(step)
        return self._step

    def _empty_cache(self, batch: int, length: int) -> Any:
        """Zeros shaped like the model's own cache for `length` positions, found by probing
        `_build_cache` at two lengths (the axis that grows is the sequence axis)."""
        from keras import ops, tree
        from keras.backend import standardize_dtype

        if self._cache_layout is None:
            one, two = self._cache_shapes(1), self._cache_shapes(2)
            layout = []
            for a, b in zip(tree.flatten(one), tree.flatten(two), strict=True):
                axes = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
                layout.append((tuple(int(d) for d in a.shape), axes[0] if axes else None, standardize_dtype(a.dtype)))
            self._cache_layout, self._cache_structure = layout, one
        tensors = []
        for shape, axis, dtype in self._cache_layout:
            full = [batch, *shape[1:]]
            if axis is not None:
                full[axis] = length
            tensors.append(ops.zeros(full, dtype))
        return tree.pack_sequence_as(self._cache_structure, tensors)

    def _cache_shapes(self, length: int) -> Any:
        """The model's cache for a batch of one `length`-token prompt; only its shapes and dtypes are read."""
        from keras import ops

        return self.model._build_cache(ops.zeros((1, length), "int32"))[1]

    def _prefill_fn(self) -> CompiledPrefill:
        """A compiled prefill: (prompt ids, empty cache) -> (logits of the last position, filled cache).

        KerasHub's `call_with_cache` has no logits_to_keep; its logits over every position feed no
        output here, so the compiler prunes them (TensorFlow's graph pruning, XLA's dead-code
        elimination), and the head (`token_embedding(reverse=True)`, soft cap included, after the
        final norm that `hidden_states` already holds, in every class of keras_support) runs on the
        last position.
        """
        if self._prefill is None:
            model = self.model

            def prefill(token_ids: Any, cache: Any) -> tuple[Any, Any]:
                _, hidden_states, cache = model.call_with_cache(token_ids, cache, 0)
                logits = model.backbone.token_embedding(hidden_states[:, -1:, :], reverse=True)
                return logits[:, -1, :], cache

            self._prefill = self._compile_prefill(prefill)
        return self._prefill

    def next_token_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [batch, vocab] of the position after the prompt, from the timed prefill's path."""
        with self._device_scope():
            ids = self._ids(input_ids)
            logits, _ = self._prefill_fn()(ids, self._empty_cache(ids.shape[0], ids.shape[1]))
            return self._float32_numpy(logits)

    def prefill(self, input_ids: np.ndarray) -> None:
        """One forward over the prompt that fills the KV cache and computes the logits of the
        last position only (as PyTorch's logits_to_keep=1)."""
        from keras import ops

        with self._device_scope():
            ids = self._ids(input_ids)
            if self.spec.kind != "causal-lm":
                self._landed(self.model(self._encoder_inputs(ids, ops.ones_like(ids)), training=False))
                return
            self._landed(self._prefill_fn()(ids, self._empty_cache(ids.shape[0], ids.shape[1])))

    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        """Greedy: prefill the prompt into the cache, then one cached step per new token."""
        from keras import ops

        with self._device_scope():
            ids = self._ids(input_ids)
            batch, prompt = ids.shape
            cache = self._empty_cache(batch, prompt + new_tokens)
            step = self._step_fn()
            tokens = []
            logits, cache = self._prefill_fn()(ids, cache)
            token = ops.cast(ops.argmax(logits, axis=-1), "int32")[:, None]
            for i in range(new_tokens):
                if i:
                    token, cache = step(token, cache, ops.convert_to_tensor(prompt + i - 1, dtype="int32"))
                self._landed(token)
                tokens.append(token)
                if on_token:
                    on_token()
            return np.asarray(ops.convert_to_numpy(ops.concatenate(tokens, axis=1))).astype(np.int64)

    def max_positions(self) -> int | None:
        config = self.config
        from_config = config.get("max_position_embeddings") or config.get("n_positions")
        return from_config or self.model.backbone.get_config().get("max_sequence_length")

    def _backbone(self) -> Any:
        return self.model if self.spec.kind != "causal-lm" else self.model.backbone

    def _encoder_inputs(self, ids: Any, mask: Any) -> dict[str, Any]:
        from keras import ops

        inputs = {"token_ids": ids, "padding_mask": mask, "segment_ids": ops.zeros_like(ids)}
        names = self._backbone().input
        return {k: v for k, v in inputs.items() if k in names}

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self._device_scope():
            return self._float32_numpy(self._embed_fn()(self._ids(input_ids), self._ids(attention_mask)))

    def _embed_fn(self) -> Callable[[Any, Any], Any]:
        """The encoder forward, (ids, mask) -> mean-pooled float32 [batch, hidden], compiled as forwards are."""
        if self._embed is None:
            from keras import ops

            backbone = self._backbone()

            def embed(token_ids: Any, mask: Any) -> Any:
                out = backbone(self._encoder_inputs(token_ids, mask), training=False)
                hidden = ops.cast(out["sequence_output"] if isinstance(out, dict) else out, "float32")
                weights = ops.cast(mask, "float32")[..., None]
                return ops.sum(hidden * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)

            self._embed = self._compile_forward(embed)
        return self._embed

    def _outputs(self, model: Any, ids: Any, mask: Any) -> np.ndarray:
        if self.spec.kind == "causal-lm":
            out = model({"token_ids": ids, "padding_mask": mask}, training=False)
        else:
            out = model(self._encoder_inputs(ids, mask), training=False)
            out = out["sequence_output"] if isinstance(out, dict) else out
        return self._float32_numpy(out)

    def roundtrip_max_abs_diff(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> float:
        """save_to_preset (KerasHub's own format, quantized variables included) to a temp dir,
        from_preset back, and compare one forward's outputs."""
        import tempfile

        with self._device_scope():
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
