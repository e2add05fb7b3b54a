"""The finetune scenario's overhead over a bare peft loop: the same model, precision and steps, side by side.

    python ci/bench/finetune_overhead.py --model tiny-llama-trained --precision nf4 --rounds 2

Each round runs `harness run --scenario finetune` (isolated workers, phase meters, contention
monitor) and then a bare loop in a fresh interpreter (from_pretrained, peft, AdamW, nothing else),
alternating so that drift in the machine's load hits both alike. Both time each step the same way
(synchronize, perf_counter, forward + backward + optimizer step) and drop the first (warm-up) step.
Prints both medians, their ratio and a Mann-Whitney U p-value over the pooled steps. A benchmark,
not a test: its numbers belong in notes, never in assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BARE_LOOP = r"""
import json, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
import peft

source, precision, seq_len, batch, steps, rank, lr = sys.argv[1:8]
seq_len, batch, steps, rank, lr = int(seq_len), int(batch), int(steps), int(rank), float(lr)
kwargs = {"device_map": "cpu"}
if precision == "fp32":
    kwargs["dtype"] = torch.float32
elif precision == "bf16":
    kwargs["dtype"] = torch.bfloat16
elif precision == "int8":
    kwargs.update(dtype=torch.float16, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
elif precision == "nf4":
    kwargs.update(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
if precision in ("int8", "nf4"):
    model = peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
model.train()
ids = torch.from_numpy(np.load(sys.argv[8]))
seconds = []
for _ in range(steps):
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds[1:]))
"""


def harness_steps(model: str, precision: str, args: argparse.Namespace, out: Path) -> tuple[list[float], str, Path]:
    """One `harness run --scenario finetune`: its timed steps, the checkpoint path and the batch it trained on."""
    run_id = f"overhead-{len(list(out.glob('overhead-*')))}"
    command = [sys.executable, "-m", "harness.cli", "run", "--scenario", "finetune", "--models", model,
               "--precisions", precision, "--devices", "cpu", "--seq-len", str(args.seq_len), "--batch-sizes",
               str(args.batch_size), "--train-steps", str(args.steps), "--lora-rank", str(args.rank),
               "--out", str(out), "--run-id", run_id, "--no-report"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    record = json.loads((out / run_id / "results.jsonl").read_text().splitlines()[0])
    if record["status"] != "ok":
        raise SystemExit(f"harness run failed: {record['error'] or record['skip_reason']}")
    batch = next((out / run_id / "adapters").glob("*/train_ids.npy"))
    return record["train_step_s_samples"], record["model_source"], batch


def bare_steps(source: str, precision: str, args: argparse.Namespace, batch_file: Path) -> list[float]:
    import numpy as np

    ids = np.load(batch_file)
    full_batch = np.stack([ids] * args.batch_size)
    path = batch_file.parent / "bare_batch.npy"
    np.save(path, full_batch)
    command = [sys.executable, "-c", BARE_LOOP, source, precision, str(args.seq_len), str(args.batch_size),
               str(args.steps), str(args.rank), "1e-3", str(path)]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama-trained")
    parser.add_argument("--precision", default="nf4", choices=("fp32", "bf16", "int8", "nf4"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from scipy.stats import mannwhitneyu

    harness, bare = [], []
    with tempfile.TemporaryDirectory(prefix="harness-overhead-") as tmp:
        for _ in range(args.rounds):
            steps, source, batch = harness_steps(args.model, args.precision, args, Path(tmp))
            harness += steps
            bare += bare_steps(source, args.precision, args, batch)
    h, b = statistics.median(harness), statistics.median(bare)
    p = mannwhitneyu(harness, bare, alternative="two-sided").pvalue
    print(f"{args.model} {args.precision} seq {args.seq_len} x batch {args.batch_size}, {args.rounds} rounds")
    print(f"harness step s: median {h:.4f} over {len(harness)} steps: {[round(s, 4) for s in harness]}")
    print(f"bare peft step s: median {b:.4f} over {len(bare)} steps: {[round(s, 4) for s in bare]}")
    print(f"ratio {h / b:.3f}, Mann-Whitney U p = {p:.3g} ({'within noise' if p >= 0.05 else 'a real difference'})")


if __name__ == "__main__":
    main()
