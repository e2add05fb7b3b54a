"""PyTorch through transformers, with bitsandbytes for int8/nf4/nf4-dq/fp4.

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
from harness.matrix import BNB_4BIT, torch_dtypes
from harness.models import check_safetensors_files

for _arch in ("llama", "gpt2", "bert", "mistral", "qwen2"):
    with contextlib.suppress(ImportError):
        __import__(f"transformers.models.{_arch}.modeling_{_arch}")


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def runs_bf16_well(device: torch.device) -> bool:
    """bf16 is native on Ampere+ GPUs and on CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        from harness.environment import cpu_info, cpu_runs_bf16_well

        return cpu_runs_bf16_well(cpu_info()[1])
    return True


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
    """Loads with from_pretrained and runs under torch.inference_mode."""

    framework = "pytorch"

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.device = self._torch_device(spec.device)
        self.model: Any = None
        self.storage_dtype: torch.dtype | None = None
        self.compute_dtype: torch.dtype | None = None
        self.prefill_kwargs: dict[str, Any] = {}
        self.prefill_logits: str | None = None  # positions whose logits the prefill computes: last | all

    @staticmethod
    def _torch_device(device: str) -> torch.device:
        if device.startswith("xla"):
            import torch_xla.core.xla_model as xm

            return xm.xla_device()
        return torch.device("cuda:0" if device == "cuda" else device)

    # --- loading --------------------------------------------------------------------------

    def prepare(self) -> dict[str, float | None]:
        """Pay, before load_s starts, what the load would otherwise include: the quantizer's import
        (bitsandbytes is not preloaded where a GPU exists, since its import probes CUDA) and the CUDA
        context. Returns quantizer_import_s and device_init_s (null where not applicable)."""
        import time

        out: dict[str, float | None] = {"quantizer_import_s": None, "device_init_s": None}
        if self.spec.precision in ("int8", *BNB_4BIT):
            start = time.perf_counter()
            import bitsandbytes  # noqa: F401

            out["quantizer_import_s"] = time.perf_counter() - start
        if self.device.type == "cuda":
            start = time.perf_counter()
            torch.cuda.init()
            torch.empty(1, device=self.device)
            torch.cuda.synchronize(self.device)
            out["device_init_s"] = time.perf_counter() - start
        return out

    def _load_kwargs(self) -> dict[str, Any]:
        precision = self.spec.precision
        kwargs: dict[str, Any] = {
            "trust_remote_code": self.spec.trust_remote_code,
            "use_safetensors": None if self.spec.allow_pickle else True,
        }
        if self.device.type != "xla":
            kwargs["device_map"] = str(self.device)
        storage, compute = torch_dtypes(precision, runs_bf16_well(self.device))
        self.storage_dtype, self.compute_dtype = getattr(torch, storage), getattr(torch, compute)
        if precision == "int8":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif precision in BNB_4BIT:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="fp4" if precision == "fp4" else "nf4",
                bnb_4bit_use_double_quant=precision == "nf4-dq",
                bnb_4bit_compute_dtype=self.compute_dtype,
            )
        kwargs["dtype"] = self.storage_dtype
        return kwargs

    def load(self) -> None:
        check_safetensors_files(self.spec.source)
        model_class = AutoModelForCausalLM if self.spec.kind == "causal-lm" else AutoModel
        model = model_class.from_pretrained(self.spec.source, **self._load_kwargs())
        if self.device.type == "xla":
            model = model.to(self.device)
        self.model = model.eval()
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
        """Every parameter, buffer and bitsandbytes quant state, each storage counted once."""
        storages: dict[tuple[str, int], int] = {}
        quant_storages: dict[tuple[str, int], int] = {}

        def add(tensor: torch.Tensor | None, into: dict[tuple[str, int], int]) -> None:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                return
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            into[key] = max(into.get(key, 0), storage.nbytes())

        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            add(tensor, storages)
        total_params = quantized_params = quantized_modules = 0
        for param in self.model.parameters():
            quant_state = getattr(param, "quant_state", None)
            total_params += quant_state.shape.numel() if quant_state is not None else param.numel()
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            quant_state = getattr(weight, "quant_state", None)
            # LLM.int8(): scales live on the weight until the first forward, then in module.state
            int8_state = getattr(module, "state", None)
            is_int8 = type(module).__name__ == "Linear8bitLt"
            if quant_state is None and not is_int8:
                continue
            quantized_modules += 1
            quantized_params += quant_state.shape.numel() if quant_state is not None else weight.numel()
            for tensor in (
                getattr(weight, "SCB", None),
                getattr(int8_state, "SCB", None),
                getattr(int8_state, "CB", None),
            ):
                add(tensor, quant_storages)
            if quant_state is not None:
                for state in (quant_state, getattr(quant_state, "state2", None)):
                    for name in ("absmax", "code", "offset"):
                        add(getattr(state, name, None), quant_storages)
        quant_only = {k: v for k, v in quant_storages.items() if k not in storages}
        quant_devices = sorted({device for device, _ in quant_storages})
        embeddings = self.model.get_input_embeddings()
        return WeightStats(
            weight_bytes=sum(storages.values()) + sum(quant_only.values()),
            param_count=total_params,
            quant_state_bytes=sum(quant_only.values()),
            quantized_modules=quantized_modules,
            quantized_param_frac=quantized_params / total_params if total_params else 0.0,
            storage_dtype=dtype_name(embeddings.weight.dtype) if embeddings is not None else None,
            compute_dtype=dtype_name(self.compute_dtype) if self.compute_dtype else None,
            architecture=type(self.model).__name__,
            quant_state_device=",".join(quant_devices) if quant_devices else None,
        )

    # --- device memory --------------------------------------------------------------------

    def reset_device_peaks(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def device_memory(self) -> dict[str, int | None]:
        if self.device.type != "cuda":
            return {}
        from harness.trackers import nvml_process_bytes

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

    @torch.inference_mode()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        out = self.model(input_ids=self._tensor(input_ids), use_cache=False)
        return out.logits.float().cpu().numpy()

    @torch.inference_mode()
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

    @torch.inference_mode()
    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = self._tensor(input_ids), self._tensor(attention_mask)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return pooled.cpu().numpy()

    @torch.inference_mode()
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

    @torch.inference_mode()
    def roundtrip_max_abs_diff(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> float:
        """save_pretrained to a temp dir, from_pretrained back (quantization config included), compare."""
        import tempfile

        def outputs(model: Any) -> torch.Tensor:
            ids, mask = self._tensor(input_ids), self._tensor(attention_mask)
            out = model(input_ids=ids, attention_mask=mask)
            return (out.logits if self.spec.kind == "causal-lm" else out.last_hidden_state).float()

        before = outputs(self.model)
        with tempfile.TemporaryDirectory(prefix="harness-roundtrip-") as tmp:
            self.model.save_pretrained(tmp)
            model_class = AutoModelForCausalLM if self.spec.kind == "causal-lm" else AutoModel
            kwargs = {"device_map": str(self.device)} if self.device.type != "xla" else {}
            reloaded = model_class.from_pretrained(tmp, dtype=self.storage_dtype, use_safetensors=True, **kwargs)
            after = outputs(reloaded.eval())
        return float((before - after).abs().max())

    def memory_bandwidth_bytes_s(self, size_bytes: int = 256 << 20) -> float:
        """Device copy bandwidth: median of timed copies of `size_bytes` (bytes read + written)."""
        from harness.trackers import copy_bandwidth_bytes_s

        src = torch.ones(size_bytes // 4, dtype=torch.float32, device=self.device)
        dst = torch.empty_like(src)
        return copy_bandwidth_bytes_s(lambda: dst.copy_(src), self.synchronize, size_bytes)
