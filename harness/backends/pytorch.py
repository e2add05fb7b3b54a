"""PyTorch through transformers; quantized precisions load through their registry family's
`quantization_config` (harness/backends/quantizers/<family>.py) and are counted by `count_weights`.

Importing this module imports torch and transformers (and the modeling code of the zoo's
architectures), so the launcher can preload it once in the forkserver.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from harness.backends.base import LoadSpec, WeightStats
from harness.backends.quantizers import count_weights
from harness.checkpoint import check_safetensors_files
from harness.registry import PRECISIONS, load_object

for _arch in ("llama", "gpt2", "bert", "mistral", "qwen2"):
    with contextlib.suppress(ImportError):
        __import__(f"transformers.models.{_arch}.modeling_{_arch}")


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def runs_bf16_well(device: torch.device) -> bool:
    """harness.environment.bf16_native for a torch device (its own compute capability on CUDA)."""
    from harness.environment import bf16_native, cpu_info, cpu_runs_bf16_well

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return bf16_native(device.type, capability, device.type == "cpu" and cpu_runs_bf16_well(cpu_info()[1]))


def _without_grad(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a backend method under inference_mode, or no_grad where the precision needs it."""

    def run(self: PyTorchBackend, *args: Any, **kwargs: Any) -> Any:
        context = torch.inference_mode() if self.precision.inference_mode else torch.no_grad()
        with context:
            return method(self, *args, **kwargs)

    return run


class _TokenClock(BaseStreamer):
    """A streamer that calls `on_token` each time generate emits new tokens (not the prompt)."""

    def __init__(self, on_token: Callable[[], None]) -> None:
        self.on_token = on_token
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_token()

    def end(self) -> None:
        pass


class PyTorchBackend:
    """Loads with from_pretrained and runs under torch.inference_mode (torch.no_grad for quantizers
    whose tensors cannot be inference tensors: the registry's `Precision.inference_mode`)."""

    framework = "pytorch"

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.precision = PRECISIONS[spec.precision]
        if "pytorch" not in self.precision.frameworks:
            raise ValueError(f"precision {spec.precision} is not a PyTorch precision")
        self.family: Any = None  # the precision's quantizer module, imported by prepare()
        self.device = self._torch_device(spec.device)
        self.model: Any = None
        self.storage_dtype: torch.dtype | None = None
        self.compute_dtype: torch.dtype | None = None
        self.prefill_kwargs: dict[str, Any] = {}
        self.prefill_logits: str | None = None  # positions whose logits the prefill computes: last | all
        self.roundtrip_parts: dict[str, float] = {}  # set by roundtrip_max_abs_diff

    @staticmethod
    def _torch_device(device: str) -> torch.device:
        if device.startswith("xla"):
            import torch_xla.core.xla_model as xm

            return xm.xla_device()
        return torch.device("cuda:0" if device == "cuda" else device)

    # --- loading --------------------------------------------------------------------------

    def prepare(self) -> dict[str, float | None]:
        """Pay, before load_s starts, what the load would otherwise include: the quantizer packages'
        import (not preloaded where a GPU exists, since their imports may probe CUDA) and the CUDA
        context. Returns quantizer_import_s and device_init_s (null where not applicable)."""
        import importlib
        import time

        out: dict[str, float | None] = {"quantizer_import_s": None, "device_init_s": None}
        if self.precision.packages:
            start = time.perf_counter()
            for package in self.precision.packages:
                importlib.import_module(package)
            out["quantizer_import_s"] = time.perf_counter() - start
        self.family = load_object(self.precision.quantizer) if self.precision.quantizer else None
        if self.device.type == "cuda":
            start = time.perf_counter()
            torch.cuda.init()
            torch.empty(1, device=self.device)
            torch.cuda.synchronize(self.device)
            out["device_init_s"] = time.perf_counter() - start
        return out

    def _load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "trust_remote_code": self.spec.trust_remote_code,
            "use_safetensors": None if self.spec.allow_pickle else True,
        }
        if self.device.type != "xla":
            kwargs["device_map"] = str(self.device)
        storage, compute = self.precision.torch_dtypes(runs_bf16_well(self.device))
        self.storage_dtype, self.compute_dtype = getattr(torch, storage), getattr(torch, compute)
        if self.precision.quantizer and self.family is None:
            self.family = load_object(self.precision.quantizer)
        config = self.family.quantization_config(self.precision, self.compute_dtype) if self.family else None
        if config is not None:  # None (as-saved): an explicit None would drop the checkpoint's own config
            kwargs["quantization_config"] = config
        kwargs["dtype"] = self.storage_dtype
        return kwargs

    def load(self) -> None:
        check_safetensors_files(self.spec.source)
        model_class = AutoModelForCausalLM if self.spec.kind == "causal-lm" else AutoModel
        model = model_class.from_pretrained(self.spec.source, **self._load_kwargs())
        if self.device.type == "xla":
            model = model.to(self.device)
        self.model = model.eval()
        if self.precision.family == "pre-quantized":  # count bytes as the quantizer that saved it stores them
            from harness.backends.quantizers.saved import family_for

            saved = getattr(model.config, "quantization_config", None)
            method = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", None)
            self.family = family_for(str(getattr(method, "value", method)))
        # Decided once here, not inside the timed prefill: generate's prefill keeps only the last logits.
        self.prefill_kwargs = {"use_cache": True}
        self.prefill_logits = "all"
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self.prefill_kwargs["logits_to_keep"] = 1
            self.prefill_logits = "last"

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "xla":
            import torch_xla.core.xla_model as xm

            xm.mark_step()
            xm.wait_device_ops()

    # --- size -----------------------------------------------------------------------------

    def weight_stats(self) -> WeightStats:
        """Every parameter, buffer and quantizer tensor, each storage counted once."""
        counted = count_weights(self.model, self.family)
        embeddings = self.model.get_input_embeddings()
        total = counted.param_count
        return WeightStats(
            weight_bytes=counted.weight_bytes,
            param_count=total,
            quant_state_bytes=counted.quant_state_bytes,
            quantized_modules=counted.quantized_modules,
            quantized_param_frac=counted.quantized_params / total if total else 0.0,
            storage_dtype=dtype_name(embeddings.weight.dtype) if embeddings is not None else None,
            compute_dtype=dtype_name(self.compute_dtype) if self.compute_dtype else None,
            architecture=type(self.model).__name__,
            quant_state_device=",".join(counted.quant_state_devices) or None,
        )

    # --- device memory --------------------------------------------------------------------

    def reset_device_peaks(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def device_memory(self) -> dict[str, int | None]:
        if self.device.type != "cuda":
            return {}
        from harness.measure.trackers import nvml_process_bytes

        return {
            "peak_device_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            "device_process_bytes": nvml_process_bytes(self.device.index or 0),
        }

    def limit_device_memory(self, limit_bytes: int) -> None:
        """Cap this process's CUDA allocator at `limit_bytes` (beyond it, allocations raise OutOfMemoryError)."""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), self.device)

    # --- running --------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @_without_grad
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        out = self.model(input_ids=self._tensor(input_ids), use_cache=False)
        return out.logits.float().cpu().numpy()

    @_without_grad
    def prefill(self, input_ids: np.ndarray) -> None:
        """One forward over the prompt that builds the KV cache, keeping only the last logits."""
        ids = self._tensor(input_ids)
        if self.spec.kind != "causal-lm":
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        else:
            self.model(input_ids=ids, **self.prefill_kwargs)

    def max_positions(self) -> int | None:
        config = self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @_without_grad
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = self._tensor(input_ids), self._tensor(attention_mask)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return pooled.cpu().numpy()

    @_without_grad
    def generate(
        self, input_ids: np.ndarray, new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> np.ndarray:
        ids = self._tensor(input_ids)
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.model.generation_config.eos_token_id or 0
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            pad_token_id=pad if isinstance(pad, int) else pad[0],
            streamer=_TokenClock(on_token) if on_token else None,
        )
        return out[:, ids.shape[1] :].cpu().numpy()

    @_without_grad
    def roundtrip_max_abs_diff(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> float:
        """save_pretrained to a temp dir, from_pretrained back (quantization config included), compare with
        the outputs before the save.

        Also sets `roundtrip_parts`: the live model's outputs after the save against before it
        (roundtrip_live_max_abs_diff: a save that changes the model in memory, as bitsandbytes 0.50.2
        does on AVX512-BF16 CPUs) and the reloaded model's against the live one's after the save
        (roundtrip_reload_max_abs_diff: what the load changed of what was saved). The live model is not
        restored: the round trip is the worker's last measurement.
        """
        import tempfile

        def outputs(model: Any) -> torch.Tensor:
            ids, mask = self._tensor(input_ids), self._tensor(attention_mask)
            out = model(input_ids=ids, attention_mask=mask)
            return (out.logits if self.spec.kind == "causal-lm" else out.last_hidden_state).float()

        before = outputs(self.model)
        with tempfile.TemporaryDirectory(prefix="harness-roundtrip-") as tmp:
            self.model.save_pretrained(tmp)
            live = outputs(self.model)
            model_class = AutoModelForCausalLM if self.spec.kind == "causal-lm" else AutoModel
            kwargs = {"device_map": str(self.device)} if self.device.type != "xla" else {}
            reloaded = model_class.from_pretrained(tmp, dtype=self.storage_dtype, use_safetensors=True, **kwargs)
            after = outputs(reloaded.eval())
        self.roundtrip_parts = {
            "roundtrip_live_max_abs_diff": float((before - live).abs().max()),
            "roundtrip_reload_max_abs_diff": float((live - after).abs().max()),
        }
        return float((before - after).abs().max())

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        """Device copy bandwidth: median of timed copies of `size_bytes` (bytes read + written)."""
        from harness.measure.trackers import copy_bandwidth_bytes_s

        src = torch.ones(size_bytes // 4, dtype=torch.float32, device=self.device)
        dst = torch.empty_like(src)
        return copy_bandwidth_bytes_s(lambda: dst.copy_(src), self.synchronize, size_bytes)
