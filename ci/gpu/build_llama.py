"""Build a random Llama checkpoint on the machine that will measure it (seconds on a GPU, nothing carried).

    python3 ci/gpu/build_llama.py OUT_DIR [--preset 1b|tiny] [--device cuda|cpu] [--profile-out DIR] [--profile-steps N]

`1b` has TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate
5632, vocab 32000): 1.10B parameters, 2.2 GB of bf16 safetensors, the anchor shape of FACTS'
H100 measurements. `tiny` has the same structure at toy size, for the CPU rehearsal. Weights are
seeded random (initializer_range 0.02; meaningless for quality, exact for size and speed), made
directly on `--device` in bf16 and written with save_pretrained beside the zoo tokenizer (vocab
1024 < 32000: its ids are valid ids of the model). The torch facts of the machine are printed
first; with --profile-out, one decode step of the saved checkpoint is profiled in this same
process afterwards (profile_decode.py), which saves a 15 s import on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

PRESETS: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024, max_position_embeddings=2048),
}  # fmt: skip
SEED = 1234


def torch_facts() -> list[str]:
    """torch's version, CUDA build, and what it sees (initializes CUDA in this process only)."""
    import torch
    import transformers

    lines = [f"torch {torch.__version__} (CUDA build {torch.version.cuda}), transformers {transformers.__version__}"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB, cc {props.major}.{props.minor}, "
                f"{props.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}"
            )
    else:
        lines.append("torch sees no CUDA device")
    return lines


def llama_config(preset: str):
    """The preset's LlamaConfig, with the zoo tokenizer's special ids."""
    from harness.zoo.config import tiny_llama_config

    return tiny_llama_config(**PRESETS[preset], initializer_range=0.02)


def build(out: Path, preset: str, device: str) -> dict[str, float]:
    """Make the model on `device` in bf16, save it with the zoo tokenizer; returns timings and size."""
    import torch
    from transformers import LlamaForCausalLM

    from harness.zoo import causal_tokenizer

    started = time.perf_counter()
    torch.manual_seed(SEED)
    config = llama_config(preset)
    config.dtype = torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    made_s = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    causal_tokenizer().save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    facts = {
        "params": params,
        "checkpoint_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "make_s": made_s,
        "save_s": time.perf_counter() - started - made_s,
    }
    (out / "build-facts.json").write_text(json.dumps({"preset": preset, "device": device, **facts}, indent=2))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--device", default="cuda", help="where the weights are made (cuda or cpu)")
    parser.add_argument("--profile-out", type=Path, help="then profile one decode step into this folder")
    parser.add_argument("--profile-steps", type=int, default=32, help="unprofiled decode steps timed (default 32)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for line in torch_facts():
        print(line, flush=True)
    facts = build(args.out, args.preset, args.device)
    print(
        f"built {args.preset} Llama: {facts['params'] / 1e9:.3f}B params, {facts['checkpoint_bytes'] / 1e9:.2f} GB "
        f"safetensors at {args.out} (made {facts['make_s']:.1f} s, saved {facts['save_s']:.1f} s)",
        flush=True,
    )
    if args.profile_out:
        from profile_decode import profile_decode, summary_lines

        summary = profile_decode(args.out, args.profile_out, args.device, steps=args.profile_steps)
        for line in summary_lines(summary):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
