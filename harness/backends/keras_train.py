"""LoRA (and full) fine-tuning of a KerasHub model, through KerasHub's own `Backbone.enable_lora`.

KerasHub puts its adapters on the attention query and value projections (its default targets) with
Keras' LoRA scaling of 1 (lora_alpha = rank); the loss is Keras' sparse categorical cross-entropy on
the next token, the optimizer Keras' AdamW. Keras has no gradient checkpointing and no LoRA merge.
TensorFlow runs the three phases as a GradientTape forward, `tape.gradient` and `apply_gradients`;
JAX as `jax.vjp` over the model's `stateless_call`, the vjp, and the optimizer's `stateless_apply`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.measure.finetune import TrainSettings, TrainSetup

ADAPTER_FILE = "adapter.lora.h5"  # KerasHub's save_lora_weights wants the .lora.h5 suffix
FULL_WEIGHTS_FILE = "model.weights.h5"
LORA_TARGETS = "query, value (KerasHub's enable_lora default)"


def _variable_bytes(variables: list[Any]) -> int:
    return sum(
        int(np.prod(v.shape)) * np.dtype(str(v.dtype).replace("bfloat16", "float16")).itemsize for v in variables
    )


class KerasTrainer:
    """What both Keras backends share: attach, gradients, save and reload; the step is the subclass's."""

    def __init__(self, backend: Any, settings: TrainSettings) -> None:
        import keras

        if settings.optimizer != "adamw":
            raise ValueError(f"--optimizer {settings.optimizer}: Keras trains with its own AdamW only")
        self.backend = backend
        self.settings = settings
        self.model = backend.model
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.optimizer = keras.optimizers.AdamW(learning_rate=settings.learning_rate)
        self.trainable: list[Any] = []
        self.gradients: list[Any] = []

    def attach(self) -> TrainSetup:
        model = self.model
        total = sum(int(np.prod(v.shape)) for v in model.weights)
        model.trainable = True  # the backend loads it frozen; enable_lora freezes all but the adapters
        if self.settings.method != "full":
            model.backbone.enable_lora(rank=self.settings.rank)
        self.trainable = list(model.trainable_variables)
        self.optimizer.build(self.trainable)
        return TrainSetup(
            trainable_params=sum(int(np.prod(v.shape)) for v in self.trainable),
            all_params=total,
            trainable_param_bytes=_variable_bytes(self.trainable),
            upcast_param_bytes=0,
            lora_alpha=self.settings.rank if self.settings.method != "full" else None,
            lora_targets=LORA_TARGETS if self.settings.method != "full" else "every weight",
            gradient_checkpointing=False,
        )

    def _inputs(self, input_ids: np.ndarray) -> tuple[dict[str, Any], Any]:
        """Inputs and next-token labels: the model sees tokens 0..n-2 and predicts 1..n-1."""
        ids = np.ascontiguousarray(input_ids).astype("int32")
        return {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}, ids[:, 1:]

    def gradients_nonzero(self) -> list[bool]:
        return [g is not None and bool(np.any(np.asarray(g))) for g in self.gradients]

    def optimizer_state_bytes(self) -> int:
        return _variable_bytes(list(self.optimizer.variables))

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        self._sync_variables()
        with self.backend._device_scope():
            out = self.model({"token_ids": input_ids[None, :].astype("int32"),
                              "padding_mask": np.ones((1, len(input_ids)), dtype="int32")}, training=False)  # fmt: skip
        return self.backend._float32_numpy(out)[0]

    def _sync_variables(self) -> None:
        """Write trained values back into the model's variables (JAX trains stateless copies)."""

    def save(self, directory: Path) -> int:
        self._sync_variables()
        if self.settings.method == "full":
            path = Path(directory) / FULL_WEIGHTS_FILE
            self.model.save_weights(str(path))
        else:
            path = Path(directory) / ADAPTER_FILE
            self.model.backbone.save_lora_weights(str(path))
        return path.stat().st_size

    def reload(self, directory: Path) -> None:
        """A fresh base from the backend with the saved adapter (full fine-tuning: the saved weights)."""
        self.backend.load()
        self.model = self.backend.model
        if self.settings.method == "full":
            self.model.load_weights(str(Path(directory) / FULL_WEIGHTS_FILE))
        else:
            self.model.trainable = True
            self.model.backbone.enable_lora(rank=self.settings.rank)
            self.model.backbone.load_lora_weights(str(Path(directory) / ADAPTER_FILE))

    def merge(self) -> None:
        raise NotImplementedError("Keras has no LoRA merge (the adapter stays a separate kernel pair)")


class TensorFlowLoraTrainer(KerasTrainer):
    """The step as a GradientTape forward, `tape.gradient`, and `apply_gradients`."""

    def forward(self, input_ids: np.ndarray) -> float:
        import tensorflow as tf

        inputs, labels = self._inputs(input_ids)
        with self.backend._device_scope():
            self._tape = tf.GradientTape()
            with self._tape:
                self._loss = self.loss_fn(labels, self.model(inputs, training=True))
        return float(self._loss)

    def backward(self) -> None:
        with self.backend._device_scope():
            self.gradients = self._tape.gradient(self._loss, self.trainable)
        self._tape = self._loss = None

    def step(self) -> None:
        with self.backend._device_scope():
            self.optimizer.apply_gradients(zip(self.gradients, self.trainable, strict=True))
        self.gradients = []


class JaxLoraTrainer(KerasTrainer):
    """The step as `jax.vjp` over `stateless_call` (forward), the vjp (backward), `stateless_apply` (step)."""

    def attach(self) -> TrainSetup:
        setup = super().attach()
        self._values = [v.value for v in self.trainable]
        self._frozen = [v.value for v in self.model.non_trainable_variables]
        self._states = [v.value for v in self.optimizer.variables]
        return setup

    def forward(self, input_ids: np.ndarray) -> float:
        import jax

        inputs, labels = self._inputs(input_ids)

        def loss_of(values: list[Any]) -> Any:
            logits, _ = self.model.stateless_call(values, self._frozen, inputs, training=True)
            return self.loss_fn(labels, logits)

        with self.backend._device_scope():
            self._loss, self._vjp = jax.vjp(loss_of, self._values)
        return float(self._loss)

    def backward(self) -> None:
        import jax.numpy as jnp

        with self.backend._device_scope():
            (self.gradients,) = self._vjp(jnp.ones_like(self._loss))
            for gradient in self.gradients:
                gradient.block_until_ready()
        self._vjp = self._loss = None

    def step(self) -> None:
        with self.backend._device_scope():
            self._values, self._states = self.optimizer.stateless_apply(self._states, self.gradients, self._values)
            for value in self._values:
                value.block_until_ready()
        self.gradients = []

    _values: list[Any] | None = None  # the trained values (None until attach(): a reloaded model is in place)

    def _sync_variables(self) -> None:
        if self._values is None:
            return
        for variable, value in zip(self.trainable, self._values, strict=True):
            variable.assign(value)
        for variable, value in zip(self.optimizer.variables, self._states, strict=True):
            variable.assign(value)
