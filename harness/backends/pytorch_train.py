"""LoRA, QLoRA and full fine-tuning of a model the PyTorch backend loaded, through peft.

How the adapter attaches is the registry's `Precision.lora`: "plain" puts peft's LoRA layers on the
layers as loaded (float, torchao, HQQ); "kbit" first runs peft's `prepare_model_for_kbit_training`
(freezes the base, casts every unquantized 16-bit parameter to fp32, and turns on gradient
checkpointing when asked), as QLoRA recipes do. Rank 0 is full fine-tuning: every float parameter
trains, no adapter. Gradient checkpointing always uses `use_reentrant=False`: with the reentrant
variant and no input that requires grad, LoRA gradients silently stay None (harness.measure.finetune checks).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import peft  # imported with this module, before the worker's memory baseline
import torch

from harness.backends.pytorch import PyTorchBackend
from harness.measure.finetune import NO_GRADIENT_REASON, TrainingFailed, TrainSettings, TrainSetup, unique_storage_bytes
from harness.plan.trainplan import enable_checkpointing


class PeftTrainer:
    """One model's training session: attach, then forward / backward / step, then save or reload."""

    def __init__(self, backend: PyTorchBackend, settings: TrainSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.model: Any = backend.model
        self.optimizer: Any = None
        self.trainable: list[torch.nn.Parameter] = []
        self._loss: torch.Tensor | None = None

    # --- set-up ------------------------------------------------------------------------------

    def _gradient_checkpointing_kwargs(self) -> dict[str, Any]:
        return {"use_reentrant": False}

    def attach(self) -> TrainSetup:
        """Prepare the model for training, attach the adapter (or unfreeze it all), make the optimizer."""
        settings, model = self.settings, self.backend.model
        upcast = 0
        if settings.method == "kbit":
            before = unique_storage_bytes(model.parameters())
            model = peft.prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=settings.gradient_checkpointing,
                gradient_checkpointing_kwargs=self._gradient_checkpointing_kwargs(),
            )
            upcast = unique_storage_bytes(model.parameters()) - before
        elif settings.gradient_checkpointing:
            enable_checkpointing(model, self._gradient_checkpointing_kwargs())
        if settings.method == "full":
            for parameter in model.parameters():
                parameter.requires_grad_(True)
            trainable, total = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters())
        else:
            config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules="all-linear",
                                lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
            model = peft.get_peft_model(model, config)
            trainable, total = model.get_nb_trainable_parameters()
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        model.train()
        return TrainSetup(
            trainable_params=int(trainable),
            all_params=int(total),
            trainable_param_bytes=unique_storage_bytes(self.trainable),
            upcast_param_bytes=upcast,
            lora_alpha=settings.alpha if settings.method != "full" else None,
            lora_targets="every Linear but the output head (peft all-linear)"
            if settings.method != "full"
            else "every weight",
            gradient_checkpointing=settings.gradient_checkpointing,
        )

    def _optimizer(self) -> Any:
        if self.settings.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(self.trainable, lr=self.settings.learning_rate)
        return torch.optim.AdamW(self.trainable, lr=self.settings.learning_rate)

    # --- one step -----------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.backend.device)

    def forward(self, input_ids: np.ndarray) -> float:
        """The training forward with labels = inputs; returns the loss (keeps it for backward)."""
        ids = self._tensor(input_ids)
        self._loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        return float(self._loss.detach())

    def backward(self) -> None:
        if self._loss is None:
            raise RuntimeError("backward() needs a forward() first")
        if not self._loss.requires_grad:  # no trainable tensor is on the loss's graph (the use_reentrant trap)
            raise TrainingFailed(NO_GRADIENT_REASON)
        self._loss.backward()
        self._loss = None

    def gradients_nonzero(self) -> list[bool]:
        """Per trainable tensor, whether its gradient exists and is not all zeros (read before step())."""
        return [p.grad is not None and bool(p.grad.count_nonzero()) for p in self.trainable]

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state_bytes(self) -> int:
        tensors = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return unique_storage_bytes(tensors)

    # --- after training -----------------------------------------------------------------------

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits [tokens, vocab] of one eval-mode forward over one sequence."""
        self.model.eval()
        with torch.no_grad():
            out = self.model(input_ids=self._tensor(input_ids[None, :]), use_cache=False)
        return out.logits[0].float().cpu().numpy()

    def save(self, directory: Path) -> int:
        """Save the adapter (or, for full fine-tuning, the whole model) as safetensors; its bytes on disk."""
        self.model.save_pretrained(directory)
        return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))

    def reload(self, directory: Path) -> None:
        """A fresh base loaded by the backend with the saved adapter attached (inference only); full
        fine-tuning: the saved model itself, loaded at the same precision."""
        if self.settings.method == "full":
            self.backend.spec = replace(self.backend.spec, source=str(directory))
            self.backend.load()
            self.model = self.backend.model
            return
        self.backend.load()
        self.model = peft.PeftModel.from_pretrained(self.backend.model, str(directory), is_trainable=False)

    def merge(self) -> None:
        """Fold the adapter into the base weights (peft's merge_and_unload); quantized bases requantize."""
        self.model = self.model.merge_and_unload()
