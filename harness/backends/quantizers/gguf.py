"""GGUF (llama.cpp): the bytes of a GGUF file's tensors, planned from the checkpoint's tensor shapes.

The harness converts a checkpoint once to F16 with llama.cpp's convert_hf_to_gguf.py and quantizes
that with llama_model_quantize (harness.backends.gguf); the backend's `weight_bytes` is the sum of the
file's tensor data. This module replays both steps' type choices without llama.cpp (pure
arithmetic, importable without llama_cpp or gguf), from llama-cpp-python 0.3.36's vendored sources:

- converter (conversion/base.py, prepare_tensors): 1-D tensors and norms F32; position embeddings
  F32; every other 2-D weight F16; buffers (rotary inv_freq, attention masks) are not written; a
  tied output head is not written (llama.cpp reuses token_embd).
- quantizer (src/llama-quant.cpp): only 2-D weights that are no norm and no position embedding
  are quantized, to the ftype's default type (`DEFAULT_TYPE`), except (llama_tensor_get_type_impl):
  the output head, and token_embd where the head is tied, get Q6_K (Q8_0 for Q8_0 files, or where
  the row is no multiple of the default type's block); attn_v / attn_qkv and ffn_down get more bits
  in some layers of the _M mixes (`use_more_bits`; attn_qkv is counted with attn_v: its own
  branch comes after attn_v's and is never reached); Q2_K and Q3_K_M raise attn_output, ffn_down
  and attn_v. A k-quant needs rows that are multiples of 256, else it falls back
  (tensor_type_fallback: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0; F16 if even the
  32-block type does not fit).

Not modelled (planned as the plain rule): mixture-of-experts and Falcon rules, the 70B attn_v bump,
imatrix-dependent choices, and small tensors a converter adds for some rope scalings (rope_freqs,
rope_factors_*: F32, head_dim / 2 values each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.registry import Precision

# ggml's block sizes: type -> (elements per block, bytes per block); equal to the gguf package's
# GGML_QUANT_SIZES (tests/test_memplan.py checks this where gguf is installed).
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
# llama_ftype_get_default_type
DEFAULT_TYPE = {
    "F16": "F16",
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q4_K_M": "Q4_K",
    "Q4_0": "Q4_0",
    "Q3_K_M": "Q3_K",
    "Q2_K": "Q2_K",
}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# llama.cpp's tensor categories from the checkpoint's module names (the converter's TensorNameMap
# gives the same roles): leaf name -> category. "c_proj" and "dense" depend on their parent.
CATEGORY_BY_LEAF = {
    "q_proj": "attn_q", "query": "attn_q", "k_proj": "attn_k", "key": "attn_k",
    "v_proj": "attn_v", "value": "attn_v",
    "qkv_proj": "attn_qkv", "c_attn": "attn_qkv", "query_key_value": "attn_qkv", "Wqkv": "attn_qkv",
    "o_proj": "attn_output", "out_proj": "attn_output",
    "gate_proj": "ffn_gate", "w1": "ffn_gate",
    "up_proj": "ffn_up", "gate_up_proj": "ffn_up", "c_fc": "ffn_up", "dense_h_to_4h": "ffn_up", "fc1": "ffn_up",
    "down_proj": "ffn_down", "dense_4h_to_h": "ffn_down", "fc2": "ffn_down", "w2": "ffn_down",
}  # fmt: skip


@dataclass(frozen=True)
class PlannedTensor:
    """One checkpoint tensor as the plan sees it; `role` is what the harness knows of its module."""

    name: str  # parameter name in the checkpoint, e.g. model.layers.0.self_attn.v_proj.weight
    row: int  # elements per row as GGUF stores it (ne[0]: a Linear's in_features, an embedding's dim)
    numel: int
    role: str  # "linear" | "token_embd" | "output" | "position_embd" | "norm" | "other"
    layer: int | None  # block index, None outside the blocks


def category(tensor: PlannedTensor) -> str:
    """llama.cpp's tensor_category for this tensor (attn_v, ffn_down, output, token_embd, ...)."""
    if tensor.role in ("token_embd", "output"):
        return tensor.role
    parts = tensor.name.removesuffix(".weight").split(".")
    leaf = parts[-1]
    if leaf in CATEGORY_BY_LEAF:
        return CATEGORY_BY_LEAF[leaf]
    if leaf in ("c_proj", "dense"):
        parent = ".".join(parts[:-1])
        if "attn" in parent or "attention" in parent:
            return "attn_output"
        if "mlp" in parent:
            return "ffn_down"
    return "other"


def baseline_type(tensor: PlannedTensor) -> str:
    """The converter's F16 file: F32 for 1-D tensors, norms and position embeddings, else F16."""
    if tensor.role in ("norm", "position_embd") or tensor.row == tensor.numel:
        return "F32"
    return "F16"


def tensor_bytes(type_name: str, numel: int) -> int:
    block, size = BLOCKS[type_name]
    return numel // block * size


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits (integer division as in C)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _fallback(type_name: str, row: int) -> str:
    """tensor_type_fallback: a type whose block does not divide the row, demoted."""
    if row % BLOCKS[type_name][0] == 0:
        return type_name
    demoted = FALLBACK.get(type_name, type_name)
    return demoted if row % BLOCKS[demoted][0] == 0 else "F16"


def tensor_type(ftype: str, tensor: PlannedTensor, *, tied: bool, layers: int, attn_v_count: int, n_gqa: int) -> str:
    """The GGUF type llama.cpp gives `tensor` in a file of `ftype` (e.g. "Q4_K_M")."""
    start = baseline_type(tensor)
    quantizable = start == "F16" and tensor.name.endswith("weight")
    if ftype == "F16" or not quantizable:
        return start
    new = default = DEFAULT_TYPE[ftype]
    cat = category(tensor)
    layer = tensor.layer or 0
    if cat == "output" or (tied and cat == "token_embd"):
        if tensor.row % BLOCKS[default][0]:
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif cat in ("attn_v", "attn_qkv"):  # category_is_attn_v: its branch comes before attn_qkv's own
        new = _attn_v_type(ftype, new, layer, attn_v_count, n_gqa)
    elif cat == "ffn_down":
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if layer < layers // 16 else "Q4_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, layers):
            new = "Q6_K"
    elif cat == "attn_output":
        new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(ftype, new)
    return _fallback(new, tensor.row)


def _attn_v_type(ftype: str, new: str, index: int, count: int, n_gqa: int) -> str:
    if ftype == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if index < 2 else "Q4_K"
    if ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(index, count):
        return "Q6_K"
    return new


def planned_types(precision: Precision, tensors: Sequence[PlannedTensor], *, layers: int, n_gqa: int) -> dict[str, str]:
    """Tensor name -> GGUF type in the precision's file (tensors in any order; one per name)."""
    ftype = precision.options["ftype"]
    tied = not any(t.role == "output" for t in tensors)
    attn_v_count = sum(category(t) in ("attn_v", "attn_qkv") for t in tensors)
    return {
        t.name: tensor_type(ftype, t, tied=tied, layers=layers, attn_v_count=attn_v_count, n_gqa=n_gqa) for t in tensors
    }


def planned_bytes(precision: Precision, tensors: Sequence[PlannedTensor], *, layers: int, n_gqa: int) -> int:
    """Bytes of every tensor's data in the precision's GGUF file (what the backend's weight_bytes sums)."""
    types = planned_types(precision, tensors, layers=layers, n_gqa=n_gqa)
    return sum(tensor_bytes(types[t.name], t.numel) for t in tensors)


def quantized_numel(precision: Precision, tensors: Sequence[PlannedTensor], *, layers: int, n_gqa: int) -> int:
    """Elements in tensors of a quantized (non-float) type."""
    types = planned_types(precision, tensors, layers=layers, n_gqa=n_gqa)
    return sum(t.numel for t in tensors if types[t.name] not in ("F32", "F16"))
