"""Issue 11: the offline GPU kit (ci/gpu/) and the checks on CUDA records (ci/gpu/cudacheck.py), on CPU.

The checks run on a real CPU run dir and on hand-made CUDA records, each made to pass and, one
field at a time, to fail. The wheelhouse size check, the offline install into a clean venv, the
NVML sampler's process roles, the profile's trace arithmetic and the entry script (plan mode, and
end to end in CPU mode) run for real.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_matrix
from harness.records import Record
from harness.zoo import zoo_dir

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "ci" / "gpu"
sys.path.insert(0, str(KIT))

import build_wheelhouse  # noqa: E402
import nvml_sampler  # noqa: E402
import packages  # noqa: E402
import profile_decode  # noqa: E402
from cudacheck import NVML_LOG, Check, main, nvml_pid_problems, read_nvml_log, run_checks  # noqa: E402

MIB = 1 << 20
GB = 10**9
LLAMA_1B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
}  # fmt: skip


# --- hand-made CUDA records -------------------------------------------------------------------


def cuda_record(precision: str, **changes: Any) -> dict[str, Any]:
    """An ok CUDA record of a 1.1B Llama that passes every check; `changes` break one thing."""
    quantized = precision not in ("fp32", "fp16", "bf16")
    dtype = {"fp32": "float32", "fp16": "float16", "int8": "float16"}.get(precision, "bfloat16")
    weights = {"fp32": 4.4, "fp16": 2.2, "bf16": 2.2, "int8": 1.23}.get(precision, 0.75) * GB
    peak = int(weights * 1.02)
    record = Record(
        model="/tmp/gpu-kit/models/llama-1b", framework="pytorch", precision=precision, device="cuda",
        status="ok", model_source="/tmp/gpu-kit/models/llama-1b", model_kind="causal-lm",
        architecture="LlamaForCausalLM", param_count=1_100_048_384, storage_dtype=dtype, compute_dtype=dtype,
        quant_state_device="cuda:0" if quantized else None, quantizer_import_s=1.4 if quantized else None,
        device_init_s=0.45, load_s=1.0, weight_bytes=int(weights), peak_device_allocated_bytes=peak,
        peak_device_reserved_bytes=int(peak * 1.05), device_process_bytes=int(peak * 1.05) + 520 * MIB,
        decode_tok_s=25.0, memory_bandwidth_bytes_s=4.3e12, decode_roofline_tok_s=4.3e12 / weights,
        decode_roofline_frac=25.0 / (4.3e12 / weights), load_bandwidth_bytes_s=2.2e9, worker_pid=4242,
    ).to_dict()  # fmt: skip
    record.update(changes)
    return record


def nvml_samples(*processes: dict[str, Any], header: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = [{"header": header or {"device": 0, "name": "NVIDIA H200", "interval_s": 0.2}}]
    lines += [{"t": 1000.0 + i, "device": 0, "processes": [p]} for i, p in enumerate(processes)]
    return lines


WORKER = {"pid": 4242, "used_bytes": 3 * GB, "ppid": 4000, "role": "worker", "cmd": "python -c from multiprocessing.forkserver import main"}  # fmt: skip
SHORT_WORKER = {"pid": 4300, "used_bytes": GB, "ppid": None, "role": "gone", "cmd": ""}


def write_run(
    run_dir: Path, records: list[dict[str, Any]], nvml: list[dict[str, Any]] | None = None, config: dict | None = None
) -> Path:
    """A run dir as run.sh leaves it: results.jsonl, model-configs/, nvml.jsonl."""
    (run_dir / "model-configs").mkdir(parents=True, exist_ok=True)
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "environment.json").write_text("{}")
    (run_dir / "model-configs" / "llama-1b.json").write_text(json.dumps(config or LLAMA_1B))
    if nvml is not None:
        (run_dir / NVML_LOG).write_text("".join(json.dumps(line) + "\n" for line in nvml))
    return run_dir


def good_records() -> list[dict[str, Any]]:
    skipped = Record("/tmp/gpu-kit/models/llama-1b", "pytorch", "fp4", "cpu", "skipped", skip_reason="not asked")
    return [cuda_record(p) for p in ("fp32", "bf16", "int8", "nf4")] + [skipped.to_dict()]


def verdicts(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def test_good_cuda_records_pass_every_check(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, good_records(), nvml_samples(WORKER, SHORT_WORKER))
    checks = run_checks(run_dir, require_cuda=True)
    assert verdicts(checks) == {
        "outcomes": "PASS", "cuda-ran": "PASS", "device-peak": "PASS", "nvml-vs-reserved": "PASS",
        "bf16-dtype": "PASS", "bnb-quant-state-device": "PASS", "decode-roofline": "PASS",
        "import-and-init-outside-load": "PASS", "cuda-contexts-only-in-workers": "PASS",
    }, [c.lines() for c in checks]  # fmt: skip
    by_name = {c.name: c for c in checks}
    assert "peak / (weights + KV + outputs) from 1.0" in by_name["device-peak"].detail
    assert "1 worker" in by_name["cuda-contexts-only-in-workers"].detail
    assert "1 of them are records' worker_pid" in by_name["cuda-contexts-only-in-workers"].detail


BROKEN: dict[str, tuple[str, dict[str, Any], str]] = {
    # case: (precision, changed fields, the check that must fail)
    "peak below the weights": ("bf16", {"peak_device_allocated_bytes": int(2.0 * GB)}, "device-peak"),
    "peak 30 % over the plan": ("bf16", {"peak_device_allocated_bytes": int(2.86 * GB)}, "device-peak"),
    "peak never measured": ("bf16", {"peak_device_allocated_bytes": None}, "device-peak"),
    "NVML below reserved": ("nf4", {"device_process_bytes": int(0.5 * GB)}, "nvml-vs-reserved"),
    "NVML null, no reason": ("nf4", {"device_process_bytes": None}, "nvml-vs-reserved"),
    "bf16 computing in fp16": ("bf16", {"compute_dtype": "float16"}, "bf16-dtype"),
    "nf4 quant state on the CPU": ("nf4", {"quant_state_device": "cpu"}, "bnb-quant-state-device"),
    "int8 quant state split": ("int8", {"quant_state_device": "cpu,cuda:0"}, "bnb-quant-state-device"),
    "roofline over 1": ("bf16", {"decode_roofline_frac": 1.3}, "decode-roofline"),
    "roofline zero": ("bf16", {"decode_roofline_frac": 0.0}, "decode-roofline"),
    "roofline null, no reason": ("bf16", {"decode_roofline_frac": None}, "decode-roofline"),
    "bitsandbytes import not separated": ("nf4", {"quantizer_import_s": None}, "import-and-init-outside-load"),
    "CUDA init not separated": ("fp32", {"device_init_s": None}, "import-and-init-outside-load"),
    "a failed combination": ("fp32", {"status": "failed", "error_kind": "crash", "error": "worker died"}, "outcomes"),
    "skipped without reason": ("fp32", {"status": "skipped", "skip_reason": ""}, "outcomes"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_check_fails_on_its_own_broken_field(tmp_path: Path, case: str) -> None:
    precision, changes, failing = BROKEN[case]
    records = [cuda_record(p, **(changes if p == precision else {})) for p in ("fp32", "bf16", "int8", "nf4")]
    checks = run_checks(write_run(tmp_path, records, nvml_samples(WORKER)), require_cuda=True)
    failed = {c.name for c in checks if c.status == "FAIL"}
    assert failed == {failing}, [c.lines() for c in checks]
    problem = next(c for c in checks if c.name == failing).problems[0]
    assert "llama-1b" in problem or "failed" in problem


def test_nvml_null_with_its_reason_passes(tmp_path: Path) -> None:
    record = cuda_record(
        "bf16", device_process_bytes=None, na_reasons={"device_process_bytes": "pid namespaces differ"}
    )
    checks = run_checks(write_run(tmp_path, [record]))
    check = next(c for c in checks if c.name == "nvml-vs-reserved")
    assert check.status == "PASS" and "pid namespaces differ" in check.detail


def test_the_first_forwards_outputs_count_in_the_expected_peak(tmp_path: Path) -> None:
    # A 2M-token vocab: 16 tokens of bf16 logits + their fp32 copy are 192 MB, more than 10 % of 1 GB
    # of weights plus the 64 MiB workspace allowance, so the check passes only by counting them.
    config = LLAMA_1B | {"vocab_size": 2_000_000}
    weights, outputs, kv = 10**9, 16 * 2_000_000 * (2 + 4), 2 * 22 * 4 * 64 * 16 * 2
    exact = cuda_record("bf16", weight_bytes=weights, peak_device_allocated_bytes=weights + kv + outputs)
    run_dir = write_run(tmp_path, [exact], config=config)
    assert next(c for c in run_checks(run_dir) if c.name == "device-peak").status == "PASS"
    write_run(tmp_path, [exact], config=LLAMA_1B)  # the same peak against a 32k vocab: too high
    assert next(c for c in run_checks(run_dir) if c.name == "device-peak").status == "FAIL"


def test_device_peak_needs_the_models_config(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, [cuda_record("bf16")])
    (run_dir / "model-configs" / "llama-1b.json").unlink()
    check = next(c for c in run_checks(run_dir) if c.name == "device-peak")
    assert check.status == "FAIL" and "no config.json" in check.problems[0]


NVML_BROKEN = {
    "the forkserver held a context": [WORKER, {**WORKER, "pid": 4000, "ppid": 3000, "role": "forkserver"}],
    "the parent held a context": [WORKER, {**WORKER, "pid": 3000, "ppid": 1, "role": "other", "cmd": "harness run"}],
    "the resource tracker held one": [{**WORKER, "pid": 3999, "role": "resource-tracker"}],
}


@pytest.mark.parametrize("case", list(NVML_BROKEN))
def test_a_context_outside_the_workers_fails(tmp_path: Path, case: str) -> None:
    run_dir = write_run(tmp_path, good_records(), nvml_samples(*NVML_BROKEN[case]))
    check = next(c for c in run_checks(run_dir, require_cuda=True) if c.name == "cuda-contexts-only-in-workers")
    assert check.status == "FAIL" and "held a CUDA context" in check.problems[0]


def test_an_nvml_log_that_shows_nothing_fails(tmp_path: Path) -> None:
    empty = read_nvml_log(write_run(tmp_path / "a", [], [{"header": {}}, {"t": 1.0, "processes": []}]) / NVML_LOG)
    assert "no compute process" in nvml_pid_problems(empty, set())[0]
    broken = read_nvml_log(write_run(tmp_path / "b", [], nvml_samples(header={"error": "NVMLError"})) / NVML_LOG)
    assert "could not be sampled" in nvml_pid_problems(broken, set())[0]
    # A pid the records name as a worker passes whatever role the sampler saw.
    parent_pid_in_records = read_nvml_log(
        write_run(tmp_path / "c", [], nvml_samples({**WORKER, "role": "other"})) / NVML_LOG
    )
    assert nvml_pid_problems(parent_pid_in_records, {4242}) == []


def test_require_cuda_fails_a_cpu_only_run_and_a_missing_nvml_log(tmp_path: Path) -> None:
    cpu = cuda_record("fp32", device="cpu")
    checks = verdicts(run_checks(write_run(tmp_path, [cpu]), require_cuda=True))
    assert checks["cuda-ran"] == "FAIL" and checks["cuda-contexts-only-in-workers"] == "FAIL"
    assert verdicts(run_checks(tmp_path))["device-peak"] == "SKIP"


def test_expect_oom_wants_the_cuda_allocators_oom(tmp_path: Path) -> None:
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 4.10 GiB"
    failed = cuda_record("fp32", status="failed", error_kind="oom", error=oom)
    assert verdicts(run_checks(write_run(tmp_path, [failed]), expect_oom=True)) == {"memory-limit-oom": "PASS"}
    host = cuda_record(
        "fp32", status="failed", error_kind="oom", error="resident memory 9000 MiB passed --memory-limit"
    )
    assert verdicts(run_checks(write_run(tmp_path, [host]), expect_oom=True)) == {"memory-limit-oom": "FAIL"}
    assert verdicts(run_checks(write_run(tmp_path, [cuda_record("fp32")]), expect_oom=True)) == {
        "memory-limit-oom": "FAIL"
    }


def test_cli_prints_one_line_per_check_and_the_anchors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_run(tmp_path, good_records(), nvml_samples(WORKER))
    (run_dir / "profile").mkdir()
    summary = {"device_name": "NVIDIA H200", "step_wall_s": 0.02, "decode_tok_s": 50.0, "decode_floor_s": 5.1e-4,
               "decode_roofline_frac": 0.0255, "raw_read_s": [0.41, 0.38], "load_s": 1.2, "decode_step": {"wall_s": 0.025, "kernel_s": 0.0009, "kernels": 400,
               "kernel_launches": 400, "device_busy_frac": 0.036}}  # fmt: skip
    (run_dir / "profile" / "summary.json").write_text(json.dumps(summary))
    assert main([str(run_dir), "--require-cuda"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("PASS ") for line in out) == 9
    assert any(line.startswith("anchors: llama-1b (1.10B)") for line in out)
    bf16 = next(line for line in out if line.strip().startswith("bf16 "))
    assert "1.00 (0.99)" in bf16 and "25.0 (16.9)" in bf16
    assert any("0.900 ms of kernels" in line for line in out)
    assert any("raw safetensors -> device 0.38 s, one from_pretrained bf16 1.20 s" in line for line in out)
    write_run(tmp_path, [cuda_record("bf16", compute_dtype="float16")])
    assert main([str(run_dir)]) == 1
    assert any(line.startswith("FAIL bf16-dtype") for line in capsys.readouterr().out.splitlines())
    assert main([str(tmp_path / "nowhere")]) == 2


# --- a real CPU run dir -----------------------------------------------------------------------


@pytest.mark.slow
def test_checks_on_a_real_cpu_run(tmp_path: Path) -> None:
    records = run_matrix(tmp_path, ("tiny-llama",), ("fp32", "bf16", "nf4"), throughput=False, quality=False, repeats=1)
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    run_dir = tmp_path / "run"
    checks = {c.name: c for c in run_checks(run_dir)}
    assert {n: c.status for n, c in checks.items()} == {
        "outcomes": "PASS", "device-peak": "SKIP", "nvml-vs-reserved": "SKIP", "bf16-dtype": "PASS",
        "bnb-quant-state-device": "PASS", "decode-roofline": "SKIP", "import-and-init-outside-load": "SKIP",
        "cuda-contexts-only-in-workers": "SKIP",
    }  # fmt: skip
    assert "quant state on cpu" in checks["bnb-quant-state-device"].detail
    assert verdicts(run_checks(run_dir, require_cuda=True))["cuda-ran"] == "FAIL"
    # The same real records, with the nf4 quant state claimed on a GPU: the check sees the mismatch.
    lines = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for line in lines:
        if line["precision"] == "nf4":
            line["quant_state_device"] = "cuda:0"
    (run_dir / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert verdicts(run_checks(run_dir))["bnb-quant-state-device"] == "FAIL"


# --- the wheelhouse -----------------------------------------------------------------------------


def clone_with_local_files(root: Path, venv_as: str) -> Path:
    """A git work tree with this repository's .gitignore and what users keep in a clone: a `.venv`
    (tox 4.67's redirect file, or a virtualenv dir), .tox, run dirs, a built wheelhouse."""
    repo = root / "clone"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text((REPO / ".gitignore").read_text())
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    subprocess.run(["git", "-C", str(repo), "add", ".gitignore", "pyproject.toml"], check=True)
    (repo / "notes.txt").write_text("untracked, not ignored: it travels")
    if venv_as == "file":
        (repo / ".venv").write_text(".tox/test\n")
    else:
        (repo / ".venv" / "bin").mkdir(parents=True)
        (repo / ".venv" / "bin" / "python").write_text("")
    for ignored in (".tox/test/bin/python", "reports/run/results.jsonl", "ci/gpu/wheelhouse/huge-1.0-py3-none-any.whl"):
        (repo / ignored).parent.mkdir(parents=True, exist_ok=True)
        (repo / ignored).write_text("ignored")
    return repo


@pytest.mark.parametrize("venv_as", ["file", "dir"])
def test_the_size_check_counts_what_travels_and_fails_over_64_mib(tmp_path: Path, venv_as: str) -> None:
    # What the device tool carries: tracked files and untracked ones git does not ignore. A `.venv`
    # (file or dir), .tox, run dirs and the wheelhouse itself stay home, whatever a clone holds.
    repo = clone_with_local_files(tmp_path, venv_as)
    tree = build_wheelhouse.tree_files(repo)
    assert sorted(p.relative_to(repo).as_posix() for p in tree) == [".gitignore", "notes.txt", "pyproject.toml"]
    wheel = tmp_path / "huge-1.0-py3-none-any.whl"
    with open(wheel, "wb") as handle:
        handle.truncate(60 * MIB)  # sparse: the size counts, no disk is used
    total = build_wheelhouse.check_carry_size([wheel], tree)
    assert total == 60 * MIB + sum(p.stat().st_size for p in tree)
    with open(tmp_path / "zoo.tar", "wb") as handle:
        handle.truncate(5 * MIB)
    with pytest.raises(build_wheelhouse.CarryTooLarge, match=r"over the 64 MiB limit; largest: huge-1.0"):
        build_wheelhouse.check_carry_size([wheel, tmp_path / "zoo.tar"], tree)
    # this repository's own tree is far below the limit, so the wheelhouse has the room it claims
    assert REPO / "pyproject.toml" in build_wheelhouse.tree_files()


def test_the_image_lacks_exactly_bitsandbytes(tmp_path: Path) -> None:
    requirements = packages.gpu_requirements()
    image = packages.read_image_packages(build_wheelhouse.DEFAULT_IMAGE_PACKAGES)
    assert [r.name for r in packages.missing_from(requirements, image)] == ["bitsandbytes"]
    # A version outside pyproject's range counts as missing; a bare name as present.
    old = tmp_path / "freeze.txt"
    old.write_text("transformers==4.57.1\npytest-benchmark\nPyTest==9.0\n")
    missing = {r.name for r in packages.missing_from(requirements, packages.read_image_packages(old))}
    assert "transformers" in missing and "pytest-benchmark" not in missing and "pytest" not in missing
    assert build_wheelhouse.pin(
        next(r for r in requirements if r.name == "bitsandbytes"), {"bitsandbytes": "0.50.2"}
    ) == ("bitsandbytes==0.50.2")


@pytest.mark.slow
def test_offline_install_into_a_clean_venv(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheel = build_wheelhouse.build_harness_wheel(wheelhouse)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheelhouse),
               "--no-deps", "harness"]  # fmt: skip
    subprocess.run(install, check=True, cwd=tmp_path)
    probe = (
        "import harness, importlib.metadata as m; print(harness.__file__); "
        "print([e.value for e in m.entry_points(group='pytest11') if e.name == 'harness'])"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    location, entry_points = out.stdout.splitlines()
    assert location.startswith(str(venv)), f"imported from {location}, not the venv"
    assert entry_points == "['harness.plugin']"
    assert wheel.name.startswith("harness-0.1.0-py3-none-any")
    help_text = subprocess.run([str(venv / "bin" / "harness"), "--help"], capture_output=True, text=True, check=True)
    assert "run the matrix" in help_text.stdout


# --- sampler, profile ---------------------------------------------------------------------------


def test_the_sampler_tells_workers_from_the_forkserver_and_the_parent() -> None:
    context = multiprocessing.get_context("forkserver")
    child = context.Process(target=time.sleep, args=(30,), daemon=True)
    child.start()
    try:
        role, ppid, cmd = nvml_sampler.process_role(child.pid)
        assert role == "worker" and "multiprocessing.forkserver" in cmd
        assert nvml_sampler.process_role(ppid)[0] == "forkserver"
        assert nvml_sampler.process_role(os.getpid())[0] == "other"
    finally:
        child.kill()
        child.join()
    assert nvml_sampler.process_role(child.pid)[0] == "gone"


def nvml_device_count() -> tuple[int, str]:
    """(GPUs NVML sees, why none) probed apart from the sampler, so its verdict can be checked."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount(), ""
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def sample_for(log: Path, seconds: float, device: int) -> int:
    import threading

    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return nvml_sampler.run(log, 0.01, device, stop)


def test_the_sampler_says_why_it_cannot_sample(tmp_path: Path) -> None:
    # Without NVML the error is the driver's; with it, a device index past the last GPU's.
    count, why = nvml_device_count()
    log = tmp_path / "nvml.jsonl"
    assert sample_for(log, 0.2, count) == 0
    nvml = read_nvml_log(log)
    assert nvml.samples == [] and nvml.header["device"] == count
    if count == 0:
        assert nvml.header["error"] == why  # the same failure the probe met
    else:
        assert nvml.header["error"].startswith("NVMLError"), nvml.header  # no such device


def test_the_sampler_samples_where_nvml_sees_a_gpu(tmp_path: Path) -> None:
    count, why = nvml_device_count()
    if count == 0:
        pytest.skip(f"NVML sees no GPU here ({why})")
    log = tmp_path / "nvml.jsonl"
    assert sample_for(log, 0.5, 0) >= 3
    nvml = read_nvml_log(log)
    assert "error" not in nvml.header and nvml.header["device"] == 0 and nvml.header["name"]
    assert len(nvml.samples) >= 3 and all(isinstance(s["processes"], list) for s in nvml.samples)


def test_trace_summary_counts_kernel_time_inside_the_region() -> None:
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "decode_step", "ts": 100, "dur": 1000},
        {"ph": "X", "cat": "kernel", "name": "gemv", "ts": 200, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "gemv", "ts": 250, "dur": 100},  # overlaps the first
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 900, "dur": 50},
        {"ph": "X", "cat": "kernel", "name": "late", "ts": 5000, "dur": 100},  # outside the region
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 150, "dur": 5},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 120, "dur": 300},
    ]
    summary = profile_decode.summarize_trace({"traceEvents": events}, "decode_step")
    assert summary["kernels"] == 3 and summary["kernel_launches"] == 1 and summary["host_ops"] == 1
    assert summary["kernel_s"] == pytest.approx(250e-6)
    assert summary["device_busy_s"] == pytest.approx(200e-6)  # 200-350 and 900-950
    assert summary["device_busy_frac"] == pytest.approx(0.2)
    assert list(summary["top_kernels_s"]) == ["gemv", "Memcpy DtoH"]
    with pytest.raises(ValueError, match="no 'generate' region"):
        profile_decode.summarize_trace({"traceEvents": events}, "generate")


# --- the entry script ---------------------------------------------------------------------------


def test_plan_mode_names_every_step_of_the_gpu_run() -> None:
    out = subprocess.run(["bash", str(KIT / "run.sh"), "--plan"], capture_output=True, text=True, check=True).stdout
    for expected in (
        "facts.py --freeze",
        "pip install --no-index --no-deps --target",
        "harness.cli zoo build tiny-bert,tiny-gpt2,tiny-llama,tiny-llama-trained",
        "build_llama.py /tmp/gpu-kit/models/llama-1b --preset 1b --device cuda --profile-out",
        "nvml_sampler.py --out /tmp/gpu-kit/nvml-harness.jsonl",
        "harness.cli run --devices cuda --models /tmp/gpu-kit/models/llama-1b,tiny-llama-trained "
        "--precisions fp32,fp16,bf16,int8,nf4,nf4-dq,fp4 --repeats 2",
        "--memory-limit 2G",
        "pytest suites/ -q -p no:cacheprovider -p harness.plugin -p pytest_benchmark.plugin --devices cuda",
        "ci/gpu/cudacheck.py",
    ):
        assert expected in out, expected
    bad = subprocess.run(["bash", str(KIT / "run.sh"), "--devices", "tpu", "--plan"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--devices is cuda or cpu" in bad.stderr


@pytest.mark.slow
def test_the_entry_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    out, work, wheelhouse = tmp_path / "out", tmp_path / "work", tmp_path / "wheelhouse"
    wheelhouse.mkdir()  # nothing to carry: this python has every requirement
    env = os.environ | {"PYTHON": sys.executable, "HARNESS_ZOO_DIR": str(zoo_dir())}
    command = ["bash", str(KIT / "run.sh"), "--devices", "cpu", "--llama", "tiny", "--run-models", "tiny-llama",
               "--suite-models", "", "--precisions", "fp32,nf4", "--run-args", "--no-throughput --no-quality --repeats 1",
               "--wheelhouse", str(wheelhouse), "--work", str(work), "--out", str(out), "--budget-s", "400"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "cudacheck.txt", "gpu-kit.log", "image-packages.txt", "run-harness.tgz",
    ]  # fmt: skip
    assert "torch==" in (out / "image-packages.txt").read_text()
    with tarfile.open(out / "run-harness.tgz") as archive:
        names = archive.getnames()
        results = archive.extractfile("harness/results.jsonl").read().decode().splitlines()
        summary = json.load(archive.extractfile("harness/profile/summary.json"))
        with gzip.open(archive.extractfile("harness/profile/decode_step_trace.json.gz")) as trace:
            assert any(e.get("name") == "decode_step" for e in json.load(trace)["traceEvents"])
    assert "harness/model-configs/llama-tiny.json" in names and "harness/model-configs/tiny-llama.json" in names
    records = [json.loads(line) for line in results]
    assert [(Path(r["model"]).name, r["precision"], r["status"]) for r in records] == [
        ("llama-tiny", "fp32", "ok"), ("llama-tiny", "nf4", "ok"), ("tiny-llama", "fp32", "ok"), ("tiny-llama", "nf4", "ok"),
    ]  # fmt: skip
    assert summary["device"] == "cpu" and summary["step_wall_s"] > 0 and summary["decode_step"]["host_ops"] > 0
    check = (out / "cudacheck.txt").read_text()
    assert "PASS outcomes: 4 records: 4 ok" in check and "PASS bnb-quant-state-device" in check
    log = (out / "gpu-kit.log").read_text()
    assert "== steps" in log and "all steps and checks passed" in log
