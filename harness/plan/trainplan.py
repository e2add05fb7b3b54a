"""A training memory plan from config.json alone: what one LoRA/QLoRA (or full) fine-tuning step needs.

Weights come from the inference plan (harness.plan.memplan: quantized layers counted by their family's
rule). Everything a training step adds is found by running one real step of the real model code
(transformers, peft, torch.optim) on fake tensors: the architecture is built on the meta device,
the adapter is attached by peft as the worker does, then every parameter becomes a FakeTensor on
the CPU (so PyTorch picks the same attention kernel as a real CPU run) and a TorchDispatchMode
counts the bytes of every storage alive, op by op. No weight is read, no memory allocated.

What the simulation stands in for:
- Quantized Linear layers are frozen Linear layers that compute like their quantizer: 4-bit
  layers cast the input to the compute dtype and save nothing for backward (bitsandbytes'
  MatMul4Bit keeps only the packed weight); LLM.int8() keeps its input on the autograd context,
  outside save_for_backward, so even gradient checkpointing keeps it (bitsandbytes 0.50: on CPU
  MatMul8bitFp keeps the input as it came, fp32 after kbit preparation; on GPUs MatMul8bitLt
  keeps it with its int8 copy); weight-only torchao layers compute in their dtype.
- "kbit" preparation casts every unquantized 16-bit parameter to fp32 (peft's
  prepare_model_for_kbit_training), which the plan adds as `upcast_bytes`.
- 8-bit AdamW (bitsandbytes) keeps two uint8 states per element plus one fp32 absmax per 256 for
  tensors of 4096 elements or more, fp32 states below (its min_8bit_size).

Phase peaks are above the worker's baseline before the load (the measured fields subtract
`rss_before_load_bytes`); on the host they add what PyTorch's CPU runtime holds beyond the tensors
once a training step has run (RUNTIME_OVERHEAD_BYTES and RUNTIME_SLACK_FRAC, measured).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any

from harness.registry import PRECISIONS

# Host memory PyTorch's CPU runtime keeps once a training step has run, beyond the tensors: a fixed
# part (oneDNN primitives, autograd and malloc arenas) and a slack that grows with what the step
# allocates (arena fragmentation, oneDNN weight reorders). Measured as peak RSS above the pre-load
# baseline minus the simulated tensor bytes, transformers 5.25, torch 2.13, peft 0.21.2: 47 MiB on
# tiny-llama-trained (2M parameters); 2-4 % (fp32) to 10-14 % (bf16, nf4) of the step's tensor
# bytes on the 0.5B Qwen2 shape. On a GPU the plan is the allocator's bytes (its context and
# reserve are the pre-flight's business).
RUNTIME_OVERHEAD_BYTES = {"cpu": 48 << 20, "cuda": 0, "xla": 0}
RUNTIME_SLACK_FRAC = {"cpu": 0.05, "cuda": 0.0, "xla": 0.0}
ADAMW8BIT_MIN_SIZE = 4096  # bitsandbytes: tensors smaller than this keep fp32 states
ADAMW8BIT_BLOCK = 256  # elements per fp32 absmax of an 8-bit state


@dataclass(frozen=True)
class TrainingPlan:
    """Predicted memory of one training step of one model at one precision, from its config alone.

    Every *_bytes total is above the worker's pre-load baseline; the phase peaks include the
    steady state (weights, upcast, adapter, optimizer states, runtime) and what the phase adds.
    """

    precision: str
    method: str  # plain | kbit | full
    weight_bytes: int  # the inference plan's weights (quantized as loaded)
    upcast_bytes: int  # kbit: unquantized 16-bit parameters cast to fp32
    trainable_params: int
    trainable_param_bytes: int  # the adapter (LoRA) or, for full fine-tuning, the weights themselves
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int  # saved for backward when the forward ends (logits and loss included)
    runtime_bytes: int  # at the peak phase: the runtime's fixed part and its slack (RUNTIME_*)
    forward_bytes: int
    backward_bytes: int
    optimizer_bytes: int
    peak_bytes: int
    peak_phase: str
    notes: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LiveBytes:
    """A TorchDispatchMode body: bytes of every storage an op output holds, until it is freed."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, Any] = {}

    def track(self, tensor: Any) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._refs:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_ref: Any, key: int = key, size: int = size) -> None:
            self.live -= size
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)

    def start_phase(self) -> int:
        self.peak = self.live
        return self.live


def _dispatch_mode(counter: _LiveBytes) -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytesMode(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor):
                    counter.track(item)
            return out

    return LiveBytesMode()


def _quantized_linear_classes(compute_dtype: Any, int8: bool, device: str) -> Any:
    """A frozen Linear that computes like a quantized one (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    int8_copy = device.partition(":")[0] != "cpu"

    class DequantizingMatmul(torch.autograd.Function):
        """A frozen quantized matmul: it keeps only the stored weight and dequantizes a temporary copy in
        each pass, so no dequantized weight outlives its matmul (bitsandbytes' MatMul4Bit keeps the packed
        weight alone). `keep_input`: LLM.int8() also keeps its input on the autograd context, outside
        save_for_backward (so gradient checkpointing keeps it too): on CPU as it came (MatMul8bitFp: A,
        the matmul in A's dtype), on GPUs with its int8 copy (MatMul8bitLt: A and CAt)."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, keep_input: bool) -> Any:
            if keep_input:
                ctx.kept = (x, torch.empty_like(x, dtype=torch.int8)) if int8_copy else (x,)
            ctx.weight = weight
            return F.linear(x, weight.to(x.dtype, copy=True))

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return grad @ ctx.weight.to(grad.dtype, copy=True), None, None

    class SimulatedQuantizedLinear(nn.Linear):
        def forward(self, x: Any) -> Any:
            if int8:
                out = DequantizingMatmul.apply(x.to(compute_dtype) if int8_copy else x, self.weight, True)
            else:  # 4-bit: the input cast to the compute dtype (peft's Linear4bit does), nothing kept
                out = DequantizingMatmul.apply(x.to(compute_dtype), self.weight, False)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.to(x.dtype)

    return SimulatedQuantizedLinear


def enable_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    """transformers' activation checkpointing (`activation_checkpointing_enable` from 5.25; the older
    `gradient_checkpointing_enable` before it)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _adamw8bit_state_bytes(numels: list[int]) -> int:
    total = 0
    for numel in numels:
        if numel < ADAMW8BIT_MIN_SIZE:
            total += 8 * numel
        else:
            total += 2 * numel + 2 * math.ceil(numel / ADAMW8BIT_BLOCK) * 4 + 2 * 256 * 4
    return total


@dataclass(frozen=True)
class _Simulated:
    trainable_params: int
    trainable_param_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int
    forward_delta: int  # peaks above the steady state of a later step
    backward_delta: int
    optimizer_delta: int
    upcast_bytes: int
    trainable_numels: tuple[int, ...]


def _simulate(
    config: dict,
    precision: str,
    method: str,
    device: str,
    fast_bf16: bool,
    seq_len: int,
    batch_size: int,
    rank: int,
    alpha: int,
    gradient_checkpointing: bool,
) -> _Simulated:
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.quantizers.quantizers_utils import should_convert_module

    from harness.plan.memplan import _keys_to_not_convert, _meta_model, _transformers_config

    spec = PRECISIONS[precision]
    storage, compute = spec.torch_dtypes(fast_bf16)
    model = _meta_model(_transformers_config(config), config, storage)
    upcast = 0
    if spec.quantized:
        keep = _keys_to_not_convert(model)
        int8 = spec.family == "bitsandbytes" and spec.bits == 8
        linear_class = _quantized_linear_classes(getattr(torch, compute), int8, device)
        for name, module in model.named_modules():
            if type(module) is nn.Linear and should_convert_module(name, keep):
                module.__class__ = linear_class
    for parameter in model.parameters():
        parameter.requires_grad_(method == "full")
    if method == "kbit":  # prepare_model_for_kbit_training: unquantized 16-bit parameters become fp32
        upcast_copies: dict[int, Any] = {}  # tied parameters (embeddings and head) are one tensor, cast once
        for module in model.modules():
            quantized_layer = type(module).__name__ == "SimulatedQuantizedLinear"
            for name, parameter in list(module._parameters.items()):
                if quantized_layer and name == "weight":
                    continue
                if parameter is not None and parameter.dtype in (torch.float16, torch.bfloat16):
                    if id(parameter) not in upcast_copies:
                        upcast += parameter.numel() * 2
                        upcast_copies[id(parameter)] = nn.Parameter(parameter.data.float(), requires_grad=False)
                    module._parameters[name] = upcast_copies[id(parameter)]
    if gradient_checkpointing:  # non-reentrant, as the trainer runs it (peft then adds no input-grad hook)
        enable_checkpointing(model, {"use_reentrant": False})
    if method != "full":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0,
                          task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
        for parameter in model.parameters():  # peft's autocast_adapter_dtype: adapters train in fp32
            if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()
    fake = FakeTensorMode()
    converted: dict[int, Any] = {}
    cpu = torch.device("cpu")
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                if id(parameter) not in converted:
                    tensor = fake.fake_tensor_converter.from_meta_and_device(fake, parameter.data, cpu)
                    converted[id(parameter)] = nn.Parameter(tensor, requires_grad=parameter.requires_grad)
                module._parameters[name] = converted[id(parameter)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                if id(buffer) not in converted:
                    converted[id(buffer)] = fake.fake_tensor_converter.from_meta_and_device(fake, buffer, cpu)
                module._buffers[name] = converted[id(buffer)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    counter = _LiveBytes()
    model.train()
    with fake:
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        with _dispatch_mode(counter):
            for tensor in [*model.parameters(), *model.buffers()]:
                counter.track(tensor)
            counter.live = counter.peak = 0
            start = counter.start_phase()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            forward_peak, saved = counter.peak - start, counter.live - start
            counter.start_phase()
            loss.backward()
            del loss
            backward_peak = counter.peak - start
            gradients = counter.live - start
            counter.start_phase()
            optimizer.step()
            optimizer_peak = counter.peak - start
            optimizer.zero_grad(set_to_none=True)
            states = counter.live - start
    return _Simulated(
        trainable_params=sum(p.numel() for p in trainable),
        trainable_param_bytes=sum(p.numel() * p.element_size() for p in trainable),
        gradient_bytes=gradients,
        optimizer_state_bytes=states,
        activation_bytes=saved,
        forward_delta=forward_peak,
        backward_delta=backward_peak,
        optimizer_delta=optimizer_peak - states,  # a later step's states already count in the steady state
        upcast_bytes=upcast,
        trainable_numels=tuple(p.numel() for p in trainable),
    )


def plan_training(
    config: dict,
    precisions: tuple[str, ...] | list[str],
    *,
    fast_bf16: bool,
    seq_len: int,
    batch_size: int,
    rank: int,
    alpha: int,
    gradient_checkpointing: bool,
    optimizer: str,
    device: str = "cpu",
) -> dict[str, TrainingPlan | str]:
    """Per precision, its TrainingPlan, or why it cannot be trained (the finetune scenario's skip reason).

    One simulation per distinct training shape (precisions that train alike, e.g. nf4 and fp4, share it).
    """
    from harness.plan.memplan import plan_memories
    from harness.registry import lora_method

    methods = {p: lora_method(p, rank) for p in precisions}
    trainable = [p for p, (method, _) in methods.items() if method and PRECISIONS[p].family != "keras"]
    # the load's layout: training never runs the eval-mode forward that repacks 4-bit weights for CPUs
    planned = plan_memories(config, trainable, fast_bf16=fast_bf16, device=device, cpu_packed_4bit=False)
    weights = {p.precision: p.weight_bytes for p in planned}
    kind = device.partition(":")[0]
    runtime, slack = RUNTIME_OVERHEAD_BYTES.get(kind, 0), RUNTIME_SLACK_FRAC.get(kind, 0.0)
    simulations: dict[tuple[Any, ...], _Simulated] = {}
    plans: dict[str, TrainingPlan | str] = {}
    for precision in precisions:
        method, reason = methods[precision]
        spec = PRECISIONS[precision]
        if method is None:
            plans[precision] = reason
            continue
        if spec.family == "keras":
            plans[precision] = "no training plan for Keras precisions (the finetune scenario trains through PyTorch)"
            continue
        int8 = spec.family == "bitsandbytes" and spec.bits == 8
        key = (spec.torch_dtypes(fast_bf16), spec.quantized, int8, method)
        if key not in simulations:
            simulations[key] = _simulate(config, precision, method, device, fast_bf16, seq_len, batch_size, rank, alpha,
                                         gradient_checkpointing)  # fmt: skip
        sim = simulations[key]
        states = sim.optimizer_state_bytes
        if optimizer == "adamw8bit":
            states = _adamw8bit_state_bytes(list(sim.trainable_numels))
        adapter = 0 if method == "full" else sim.trainable_param_bytes
        steady = weights[precision] + sim.upcast_bytes + adapter + states
        tensors = {"train_forward": steady + sim.forward_delta, "train_backward": steady + sim.backward_delta,
                   "train_optimizer": steady + sim.optimizer_delta}  # fmt: skip
        phases = {name: tensor_bytes + int(tensor_bytes * slack) + runtime for name, tensor_bytes in tensors.items()}
        peak_phase = max(phases, key=lambda p: phases[p])
        notes = [f"{method} LoRA rank {rank}" if method != "full" else "full fine-tuning"]
        if sim.upcast_bytes:
            notes.append(f"prepare_model_for_kbit_training casts {sim.upcast_bytes // 2:,} 16-bit parameters to fp32")
        notes.append("gradient checkpointing" if gradient_checkpointing else "no gradient checkpointing")
        plans[precision] = TrainingPlan(
            precision=precision,
            method=method,
            weight_bytes=weights[precision],
            upcast_bytes=sim.upcast_bytes,
            trainable_params=sim.trainable_params,
            trainable_param_bytes=sim.trainable_param_bytes,
            gradient_bytes=sim.gradient_bytes,
            optimizer_state_bytes=states,
            activation_bytes=sim.activation_bytes,
            runtime_bytes=phases[peak_phase] - tensors[peak_phase],
            forward_bytes=phases["train_forward"],
            backward_bytes=phases["train_backward"],
            optimizer_bytes=phases["train_optimizer"],
            peak_bytes=phases[peak_phase],
            peak_phase=peak_phase,
            notes="; ".join(notes),
        )
    return plans


def training_plans_for(config: dict, precisions: tuple[str, ...], fast_bf16: bool, options: Any, device: str) -> dict:
    """Worker side of the pre-flight (mode "plan", finetune scenario): each precision's plan as a dict,
    or the reason it cannot train."""
    plans = plan_training(
        config,
        tuple(dict.fromkeys(precisions)),
        fast_bf16=fast_bf16,
        seq_len=options.seq_len,
        batch_size=options.train_batch_size,
        rank=options.lora_rank,
        alpha=options.effective_lora_alpha,
        gradient_checkpointing=options.gradient_checkpointing,
        optimizer=options.optimizer,
        device=device,
    )
    return {name: plan if isinstance(plan, str) else plan.to_dict() for name, plan in plans.items()}
