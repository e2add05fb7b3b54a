"""Issue 20: the training memory plan (harness.plan.trainplan), from config.json alone, on fake tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_matrix
from harness.plan.memplan import plan_memories, read_config
from harness.plan.trainplan import TrainingPlan, plan_training

CONFIGS = Path(__file__).parent / "data" / "configs"
LLAMA_3_8B = CONFIGS / "llama-3-8b"
# LoRA rank 8 on every Linear of Llama-3-8B but lm_head, by hand: r x (in + out) for q (4096+4096),
# k and v (4096+1024), o (4096+4096), gate and up (4096+14336), down (14336+4096), 32 layers.
LLAMA_3_8B_LORA_R8 = 32 * 8 * (2 * 8192 + 2 * 5120 + 3 * 18432)


def _plans(config: dict, precisions: tuple[str, ...], **overrides: object) -> dict[str, TrainingPlan | str]:
    settings: dict = dict(fast_bf16=True, seq_len=64, batch_size=2, rank=8, alpha=16, gradient_checkpointing=True,
                          optimizer="adamw", device="cpu") | overrides  # fmt: skip
    return plan_training(config, precisions, **settings)


def test_the_plan_counts_the_adapter_states_and_upcast_by_hand() -> None:
    config = read_config("tiny-llama-trained")
    plans = _plans(config, ("fp32", "bf16", "nf4", "int8", "quanto-int4"))
    lora = 4 * 8 * (2 * (192 + 192) + 2 * (192 + 64) + 3 * (192 + 512))
    # what stays unquantized: embeddings and lm_head (untied, 1024 x 192 each) and 9 norms of 192
    unquantized = 2 * 1024 * 192 + 9 * 192
    for precision in ("fp32", "bf16", "nf4", "int8"):
        plan = plans[precision]
        assert isinstance(plan, TrainingPlan)
        assert plan.trainable_params == lora
        assert plan.trainable_param_bytes == 4 * lora  # fp32 adapters
        assert plan.optimizer_state_bytes >= 2 * 4 * lora  # AdamW: two fp32 states per element
        assert plan.optimizer_state_bytes <= 2 * 4 * lora + 8 * 7 * 4 * 4  # and a step counter per tensor
        assert (
            plan.forward_bytes > plan.weight_bytes and plan.backward_bytes > plan.forward_bytes - plan.activation_bytes
        )
    assert plans["nf4"].upcast_bytes == plans["int8"].upcast_bytes == 2 * unquantized
    assert plans["fp32"].upcast_bytes == plans["bf16"].upcast_bytes == 0
    planned = plan_memories(config, ("fp32", "nf4"), fast_bf16=True, cpu_packed_4bit=False)  # as training loads
    weights = {p.precision: p.weight_bytes for p in planned}
    assert plans["fp32"].weight_bytes == weights["fp32"] and plans["nf4"].weight_bytes == weights["nf4"]
    assert (
        plans["quanto-int4"]
        == "peft has no LoRA layer for optimum-quanto (its maintainers keep quanto in maintenance mode)"
    )


def test_checkpointing_int8_and_8bit_adam_move_the_plan_the_way_measured() -> None:
    config = read_config("tiny-llama-trained")
    on = _plans(config, ("bf16", "int8", "nf4"), seq_len=256, batch_size=4)
    off = _plans(config, ("bf16",), seq_len=256, batch_size=4, gradient_checkpointing=False)
    # gradient checkpointing keeps one hidden state per layer instead of every activation
    assert off["bf16"].activation_bytes > 2 * on["bf16"].activation_bytes
    # On CPU, LLM.int8() in training keeps each quantized layer's input as it came (fp32 after kbit
    # preparation) on the autograd context, outside checkpointing: per token and layer the inputs of
    # q, k and v (one tensor of 192), o (192), gate and up (one of 192) and down (512), 4 bytes each; the
    # real step's peak is checked against the plan in tests/test_finetune_scenario.py
    kept = 4 * 256 * 4 * (192 + 192 + 192 + 512) * 4
    assert on["int8"].activation_bytes - on["nf4"].activation_bytes == pytest.approx(kept, rel=0.02)
    # bitsandbytes' AdamW8bit: two uint8 states, an fp32 absmax per 256 and two 256-entry fp32 maps for a
    # tensor of 4096 elements or more; fp32 states below. Per layer, lora_A (8 x in) and lora_B (out x 8):
    lora_numels = [8 * 192] * 6 + [8 * 512] + [192 * 8, 64 * 8, 64 * 8, 192 * 8, 512 * 8, 512 * 8, 192 * 8]
    per_layer = sum(2 * n + 2 * (n // 256) * 4 + 2 * 256 * 4 if n >= 4096 else 8 * n for n in lora_numels)
    eight = _plans(config, ("bf16",), optimizer="adamw8bit")["bf16"]
    assert eight.optimizer_state_bytes == 4 * per_layer


@pytest.mark.parametrize("int8", [False, True])
def test_a_quantized_stand_in_keeps_no_dequantized_weight_for_backward(int8: bool) -> None:
    """bitsandbytes' MatMul4Bit and MatMul8bit keep the stored weight and dequantize it again in the
    backward: the stand-in saves no weight-sized tensor (a plain F.linear on a dequantized copy would
    keep every layer's copy alive until the backward: +24 GiB on Llama-2-7B without checkpointing)."""
    import torch

    from harness.plan.trainplan import _quantized_linear_classes

    layer = _quantized_linear_classes(torch.bfloat16, int8, "cpu")(64, 96, bias=False).requires_grad_(False)
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert out.dtype == x.dtype and out.shape == (2, 5, 96)
    assert layer.weight.shape not in saved and layer.weight.t().shape not in saved, saved
    out.sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, 5, 96) @ layer.weight.to(torch.bfloat16).float(), rtol=0.02, atol=0.02)


def test_llama_3_8b_plan_answers_which_precisions_fit_a_24_gib_card() -> None:
    """`harness plan --finetune --seq-len 2048 --batch-sizes 4 --available-memory 24GiB`, for real."""
    argv = [sys.executable, "-m", "harness.cli", "plan", "--finetune", "--models", str(LLAMA_3_8B), "--devices",
            "cpu", "--seq-len", "2048", "--batch-sizes", "4", "--available-memory", "24GiB", "--precisions",
            "fp32,bf16,int8,nf4,quanto-int4", "--format", "json"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True).stdout
    rows = {r["precision"]: r for r in json.loads(out)}
    assert rows["nf4"]["trainable_param_bytes"] == 4 * LLAMA_3_8B_LORA_R8
    need = {p: rows[p]["needed_bytes"] for p in ("fp32", "bf16", "int8", "nf4")}
    assert need["nf4"] < need["bf16"] < need["fp32"]
    assert need["int8"] > need["bf16"]  # LLM.int8() keeps every quantized layer's input (see above)
    # the logits alone: 4 x 2048 tokens x 128,256 vocab in fp32, several copies in the loss
    assert rows["bf16"]["backward_bytes"] - rows["bf16"]["weight_bytes"] > 4 * 2048 * 128_256 * 4 * 2
    assert [rows[p]["fits_cpu"] for p in ("fp32", "bf16", "int8")] == [False, False, False]
    assert rows["nf4"]["fits_cpu"] == (need["nf4"] <= 24 * 2**30 * 0.95)
    assert rows["quanto-int4"]["fits_cpu"] is False and "peft has no LoRA" in rows["quanto-int4"]["notes"]


def test_the_preflight_skips_a_training_row_that_cannot_fit_with_the_numbers(tmp_path: Path) -> None:
    options = dict(scenario="finetune", seq_len=64, batch_sizes=(2,), train_steps=3, available_memory_bytes=60 << 20)
    records = run_matrix(tmp_path, ("tiny-llama-trained",), ("fp32", "nf4"), **options)
    fp32 = next(r for r in records if r["precision"] == "fp32")
    assert fp32["status"] == "skipped"
    assert fp32["skip_reason"].startswith("training needs ≈ ") and "--no-preflight" in fp32["skip_reason"]
    assert fp32["predicted_train_backward_bytes"] > 60 << 20
    assert not list((tmp_path / "run" / "logs").glob("*fp32-cpu.log"))  # no worker ever loaded it
