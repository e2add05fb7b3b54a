"""Where one decode step's time goes: torch.profiler over a batch-1 decode step, kernel time vs wall.

    python3 ci/gpu/profile_decode.py MODEL_DIR --out DIR [--device cuda] [--prompt-tokens 128]

Times a raw read of the checkpoint's safetensors onto the device (the floor under load_s), loads
the checkpoint as the harness's bf16 combination does (from_pretrained, dtype bfloat16,
device_map; one load, cold for this process), prefills a prompt into a KV cache, warms up, and then:
- times `--steps` plain decode steps (one forward of one token against the cache, then argmax),
  synchronized, without the profiler: `step_wall_s` (median);
- profiles one decode step and one short greedy `generate` (what the harness times), each into a
  gzipped Chrome trace (`decode_step_trace.json.gz`, `generate_trace.json.gz`), and summarizes each
  trace: wall, summed device kernel time, device busy time (union of kernel intervals), kernel
  launches, the top kernels and the top host operators;
- measures the device copy bandwidth (bytes read + written) and the weight bytes, so the decode
  floor (bandwidth / weight bytes per step) sits beside the measured step.

Writes `summary.json` beside the traces. The trace parsing reads the exported Chrome trace (events
with cat "kernel", "gpu_memcpy", "gpu_memset"), which is stable across torch versions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
TOP = 8


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end_so_far = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= end_so_far:
            continue
        total += end - max(start, end_so_far)
        end_so_far = end
    return total


def summarize_trace(trace: dict[str, Any], region: str) -> dict[str, Any]:
    """Kernel time against wall for the user annotation `region` of a Chrome trace (times in seconds)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    regions = [e for e in events if e.get("name") == region and e.get("cat") == "user_annotation"]
    if not regions:
        raise ValueError(f"no '{region}' region in the trace")
    wall = regions[0]
    start, end = wall["ts"], wall["ts"] + wall["dur"]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and start <= e["ts"] <= end]
    host_ops = [e for e in events if e.get("cat") == "cpu_op" and start <= e["ts"] <= end]
    launches = [e for e in events if e.get("name") in LAUNCH_NAMES and start <= e["ts"] <= end]
    by_kernel: dict[str, float] = {}
    for event in device:
        by_kernel[event["name"]] = by_kernel.get(event["name"], 0.0) + event["dur"]
    by_op: dict[str, float] = {}
    for event in host_ops:
        by_op[event["name"]] = by_op.get(event["name"], 0.0) + event["dur"]
    kernel_us = sum(e["dur"] for e in device)
    busy = busy_us([(e["ts"], e["ts"] + e["dur"]) for e in device])
    return {
        "region": region,
        "wall_s": wall["dur"] / 1e6,
        "kernel_s": kernel_us / 1e6,
        "device_busy_s": busy / 1e6,
        "device_busy_frac": busy / wall["dur"] if wall["dur"] else None,
        "kernels": len(device),
        "kernel_launches": len(launches),
        "host_ops": len(host_ops),
        "top_kernels_s": {k: v / 1e6 for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:TOP]},
        "top_host_ops_s": {k: v / 1e6 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:TOP]},
    }


def _export(prof: Any, path: Path) -> dict[str, Any]:
    """Write the profiler's Chrome trace gzipped at `path` and return it parsed."""
    raw = path.with_suffix("")  # x.json.gz -> x.json
    prof.export_chrome_trace(str(raw))
    text = raw.read_text()
    with gzip.open(path, "wt") as handle:
        handle.write(text)
    raw.unlink()
    return json.loads(text)


def profile_decode(
    model_dir: Path, out: Path, device: str = "cuda", prompt_tokens: int = 128, steps: int = 32,
    generate_tokens: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """Profile one decode step and one short generate of the bf16 checkpoint; write traces and summary.json."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch_device = torch.device("cuda:0" if device == "cuda" else device)
    on_cuda = torch_device.type == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(torch_device)

    raw_read_s = raw_read_seconds(model_dir, torch_device, sync)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=str(torch_device))
    model.eval()
    sync()
    load_s = time.perf_counter() - started
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1024, (1, prompt_tokens), generator=generator).to(torch_device)
    state: dict[str, Any] = {}

    with torch.inference_mode():
        output = model(input_ids=prompt, use_cache=True)
        state["cache"], state["token"] = output.past_key_values, output.logits[:, -1:].argmax(-1)

        def decode_step() -> None:
            result = model(input_ids=state["token"], past_key_values=state["cache"], use_cache=True)
            state["cache"], state["token"] = result.past_key_values, result.logits[:, -1:].argmax(-1)

        def generate() -> None:
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           min_new_tokens=generate_tokens, max_new_tokens=generate_tokens, pad_token_id=0)  # fmt: skip

        for _ in range(5):
            decode_step()
        generate()
        walls = []
        for _ in range(steps):
            sync()
            tick = time.perf_counter()
            decode_step()
            sync()
            walls.append(time.perf_counter() - tick)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        summaries = {}
        for region, run, file in (("decode_step", decode_step, "decode_step_trace.json.gz"),
                                  ("generate", generate, "generate_trace.json.gz")):  # fmt: skip
            sync()
            with profile(activities=activities) as prof:
                with record_function(region):
                    run()
                    sync()
            summaries[region] = summarize_trace(_export(prof, out / file), region)
        bandwidth = copy_bandwidth_bytes_s(torch_device, sync) if on_cuda else None

    step_wall_s = statistics.median(walls)
    floor_s = weight_bytes / bandwidth if bandwidth else None
    summary = {
        "model_dir": str(model_dir),
        "device": str(torch_device),
        "device_name": torch.cuda.get_device_name(torch_device) if on_cuda else "cpu",
        "torch": torch.__version__,
        "raw_read_s": raw_read_s,
        "load_s": load_s,
        "weight_bytes": weight_bytes,
        "prompt_tokens": prompt_tokens,
        "step_wall_s": step_wall_s,
        "step_wall_s_samples": walls,
        "decode_tok_s": 1.0 / step_wall_s,
        "memory_bandwidth_bytes_s": bandwidth,
        "decode_floor_s": floor_s,
        "decode_roofline_frac": floor_s / step_wall_s if floor_s else None,
        "generate_tokens": generate_tokens,
        "decode_step": summaries["decode_step"],
        "generate": summaries["generate"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def raw_read_seconds(model_dir: Path, device: Any, sync: Any, repeats: int = 2) -> list[float]:
    """Seconds to read the checkpoint's safetensors straight onto the device (no model): the floor under load_s."""
    from safetensors.torch import load_file

    samples = []
    for _ in range(repeats):
        sync()
        tick = time.perf_counter()
        tensors = [load_file(str(path), device=str(device)) for path in sorted(model_dir.glob("*.safetensors"))]
        sync()
        samples.append(time.perf_counter() - tick)
        del tensors
    return samples


def copy_bandwidth_bytes_s(device: Any, sync: Any, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Median device-to-device copy rate, counting bytes read plus written."""
    import torch

    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(repeats):
        sync()
        tick = time.perf_counter()
        dst.copy_(src)
        sync()
        rates.append(2 * size_bytes / (time.perf_counter() - tick))
    return statistics.median(rates)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A few printable lines: where one decode step's time goes."""
    step, gen = summary["decode_step"], summary["generate"]
    lines = [
        f"profile {summary['device_name']}: from_pretrained {summary['load_s']:.2f} s (raw safetensors read "
        f"{min(summary['raw_read_s']):.2f} s), weights {summary['weight_bytes'] / 1e9:.2f} GB;"
        f" decode step {summary['step_wall_s'] * 1e3:.2f} ms wall ({summary['decode_tok_s']:.1f} tok/s unprofiled)",
        f"  one profiled step: wall {step['wall_s'] * 1e3:.2f} ms, kernels {step['kernel_s'] * 1e3:.2f} ms "
        f"({step['kernels']} kernels, {step['kernel_launches']} launches, {step['host_ops']} host ops), "
        f"device busy {(step['device_busy_frac'] or 0) * 100:.1f} % of wall",
        f"  generate {summary['generate_tokens']} tokens: wall {gen['wall_s'] * 1e3:.1f} ms, "
        f"kernels {gen['kernel_s'] * 1e3:.1f} ms, device busy {(gen['device_busy_frac'] or 0) * 100:.1f} %",
    ]
    if summary["decode_floor_s"]:
        lines.append(
            f"  floor (weights / {summary['memory_bandwidth_bytes_s'] / 1e12:.2f} TB/s copy) "
            f"{summary['decode_floor_s'] * 1e3:.3f} ms per step: decode at {summary['decode_roofline_frac'] * 100:.1f} %"
            " of it"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the traces and summary.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    for line in summary_lines(profile_decode(args.model_dir, args.out, args.device, args.prompt_tokens)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
