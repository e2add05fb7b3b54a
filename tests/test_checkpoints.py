"""Checkpoints as users have them (issue 9): the pre-flight memory plan, sharded safetensors, hub ids
through the local Hugging Face cache, weights-only directories, models that are not causal LMs,
and the chunked quality pass at a 128k vocabulary. Every run is real: real checkpoints written with
save_pretrained, loaded by isolated workers through the runner."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import by_precision, run_matrix
from harness.zoo import causal_tokenizer, ensure_built
from harness.zoo.config import tiny_llama_config

pytestmark = pytest.mark.slow
LOAD_ONLY = dict(throughput=False, quality=False, repeats=1)
MB = 1 << 20


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12M-parameter Llama (49 MB in fp32, 13 MB in nf4) saved as three safetensors shards."""
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("ckpt") / "llama-12m-sharded"
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=512, intermediate_size=1408))
    model.save_pretrained(out, max_shard_size="20MB")
    causal_tokenizer().save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


def test_preflight_skips_what_does_not_fit_and_runs_what_does(tmp_path: Path, sharded_llama: Path) -> None:
    records = by_precision(
        run_matrix(tmp_path, (str(sharded_llama),), ("fp32", "nf4"), available_memory_bytes=40 * MB, **LOAD_ONLY),
        str(sharded_llama),
    )
    fp32, nf4 = records["fp32"], records["nf4"]
    assert fp32["status"] == "skipped", fp32
    reason = fp32["skip_reason"]
    assert "needs ≈" in reason and "weights" in reason and "KV" in reason and "40.0 MiB" in reason, reason
    assert re.search(r"; (fp16|bf16|int8|nf4|nf4-dq|fp4) needs \d", reason), reason  # names what would fit
    assert fp32["worker_wall_s"] is None  # no worker ever started for it
    assert fp32["predicted_weight_bytes"] > 40 * MB * 0.95
    assert nf4["status"] == "ok", nf4
    error = abs(nf4["weight_bytes"] - nf4["predicted_weight_bytes"]) / nf4["weight_bytes"]
    assert error < 0.02, (nf4["weight_bytes"], nf4["predicted_weight_bytes"])
    assert nf4["predicted_peak_bytes"] >= nf4["predicted_weight_bytes"]


def test_sharded_checkpoint_loads_and_counts_every_shard(tmp_path: Path, sharded_llama: Path) -> None:
    (record,) = run_matrix(tmp_path, (str(sharded_llama),), ("fp32",), **LOAD_ONLY)
    assert record["status"] == "ok", record
    shards = sorted(sharded_llama.glob("model-*.safetensors"))
    assert record["checkpoint_bytes"] == sum(p.stat().st_size for p in shards)
    assert abs(record["weight_bytes"] - record["checkpoint_bytes"]) / record["checkpoint_bytes"] < 0.01


def test_only_the_files_from_pretrained_reads_are_counted(tmp_path: Path, sharded_llama: Path) -> None:
    clone = tmp_path / "clone-with-other-formats"
    shutil.copytree(sharded_llama, clone)
    (clone / "tf_model.h5").write_bytes(b"\0" * MB)  # a hub clone that ships several formats
    (clone / "pytorch_model.bin").write_bytes(b"\0" * MB)
    (record,) = run_matrix(tmp_path / "runs", (str(clone),), ("fp32",), **LOAD_ONLY)
    shards = sorted(sharded_llama.glob("model-*.safetensors"))
    assert record["checkpoint_bytes"] == sum(p.stat().st_size for p in shards)


def test_a_missing_shard_is_a_failure_record_naming_it_and_the_run_goes_on(tmp_path: Path, sharded_llama: Path) -> None:
    broken = tmp_path / "missing-shard"
    shutil.copytree(sharded_llama, broken)
    missing = sorted(broken.glob("model-*.safetensors"))[1]
    missing.unlink()
    records = run_matrix(tmp_path / "runs", (str(broken), "tiny-llama"), ("fp32",), **LOAD_ONLY)
    failed = next(r for r in records if r["model"] == str(broken))
    assert failed["status"] == "failed" and missing.name in failed["error"], failed
    assert "\n" not in failed["error"]
    assert next(r for r in records if r["model"] == "tiny-llama")["status"] == "ok"


def _hub_cache(root: Path, repo_id: str, source: Path, revision: str) -> Path:
    """The Hugging Face cache layout for one repo: blobs, refs/main and a snapshot of links."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.startswith("harness-"):
            blob = repo / "blobs" / f"{file.name}.blob"
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def _harness(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | env_extra
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)  # fmt: skip


def test_hub_id_resolves_through_the_offline_cache(tmp_path: Path) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf-cache"
    snapshot = _hub_cache(cache, "harness-test/tiny-llama", ensure_built("tiny-llama"), revision)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    done = _harness(["run", "--models", "harness-test/tiny-llama", "--precisions", "fp32", "--devices", "cpu",
                     "--no-throughput", "--no-quality", "--no-cold", "--repeats", "1", "--no-report", "--out", "runs"],
                    env, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = (tmp_path / "runs" / "latest" / "results.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["status"] == "ok" and record["model"] == "harness-test/tiny-llama"
    assert record["model_revision"] == revision
    assert Path(record["model_source"]) == snapshot

    missing = _harness(["run", "--models", "harness-test/not-cached", "--devices", "cpu"], env, tmp_path)
    assert missing.returncode == 2
    (message,) = missing.stderr.strip().splitlines()
    assert "HF_HUB_OFFLINE" in message and "harness-test/not-cached" in message and "hf download" in message


def test_encoder_decoder_models_are_skipped_before_loading(tmp_path: Path) -> None:
    from harness.zoo.archs import build_arch_checkpoint

    t5 = build_arch_checkpoint("t5", tmp_path / "tiny-t5")
    (record,) = run_matrix(tmp_path / "runs", (str(t5),), ("fp32",), **LOAD_ONLY)
    assert record["status"] == "skipped"
    assert "encoder-decoder" in record["skip_reason"] and "T5ForConditionalGeneration" in record["skip_reason"]
    assert record["worker_wall_s"] is None and record["load_s"] is None
    logs = list((tmp_path / "runs" / "run" / "logs").glob("*tiny-t5*"))
    assert not logs, logs  # no worker (not even the plan) ever opened it


def test_a_checkpoint_without_tokenizer_measures_all_but_quality(tmp_path: Path) -> None:
    source = ensure_built("tiny-llama-trained")
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, bare / name)
    options = dict(repeats=1, timing_repeats=2, min_timing_s=0.0, new_tokens=8, greedy_tokens=8)
    (record,) = run_matrix(tmp_path / "bare", (str(bare),), ("fp32",), **options)
    assert record["status"] == "ok", record
    assert record["load_s"] > 0 and record["decode_tok_s"] > 0 and record["prefill_tok_s"] > 0
    assert record["kl_mean"] is None and record["na_reasons"]["kl_mean"] == "no tokenizer: pass --tokenizer"
    assert record["tokenizer_source"] is None

    (complete,) = run_matrix(tmp_path / "with", (str(bare),), ("fp32",), tokenizer=str(source), **options)
    assert complete["status"] == "ok" and complete["kl_mean"] == 0.0
    assert complete["tokenizer_source"] == str(source)


def test_the_quality_pass_peak_does_not_grow_with_eval_tokens_times_vocab(tmp_path: Path) -> None:
    """2,048 tokens x 128,256 vocab of fp32 logits is 1.05 GB per copy; the chunked pass holds one
    256-token chunk (131 MB) plus float64 blocks of 32 tokens, whatever the number of tokens.

    The quality pass's token budget scales with the measured forward rate (harness.measure.quality
    scaled_eval_tokens), so a slow or busy machine would compare fewer tokens; a time budget no
    forward here comes near keeps all 2,048, on any machine."""
    from harness.zoo.archs import LARGE_VOCAB_SIZE, build_large_vocab_llama

    model = build_large_vocab_llama(tmp_path / "llama-128k")
    (record,) = run_matrix(tmp_path / "runs", (str(model),), ("fp32",), throughput=False, repeats=1,
                           eval_tokens=2048, greedy_tokens=4, time_budget_s=3600.0)  # fmt: skip
    assert record["status"] == "ok", record
    assert record["eval_tokens"] == record["eval_tokens_requested"] >= 2047, record["eval_tokens"]
    full_logits = record["eval_tokens"] * LARGE_VOCAB_SIZE * 4
    growth = record["peak_rss_anon_quality_bytes"] - record["rss_anon_bytes"]
    assert growth < full_logits / 2, (growth, full_logits)
    planned = record["predicted_peak_bytes"] - record["predicted_weight_bytes"]
    assert growth < planned + 64 * MB, (growth, planned)


def test_harness_plan_prints_what_fits_without_loading(tmp_path: Path) -> None:
    config_dir = Path(__file__).parent / "data" / "configs" / "llama-3-8b"
    done = _harness(["plan", "--models", str(config_dir), "--devices", "cpu", "--available-memory", "16GiB",
                     "--format", "json"], {}, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    fits = {row["precision"]: row["fits_cpu"] for row in json.loads(done.stdout)}
    assert fits["fp32"] is False and fits["bf16"] is False and fits["fp16"] is False
    assert fits["int8"] is True and fits["nf4"] is True and fits["nf4-dq"] is True


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "causal-lm"),
        ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "other-head"),
        ({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}, "encoder"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, "encoder"),
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
         "encoder-decoder"),
    ],
)  # fmt: skip
def test_model_kinds_and_which_are_skipped(config: dict[str, Any], kind: str) -> None:
    from harness.plan.models import ModelSource, model_kind_from_config, unsupported_model_reason

    assert model_kind_from_config(config) == kind
    model = ModelSource("m", "/m", kind, config["model_type"], True, architecture=config["architectures"][0])
    reason = unsupported_model_reason(model)
    assert (reason is None) == (kind in ("causal-lm", "encoder"))
    if reason:
        assert config["architectures"][0] in reason and "never loads it as the wrong class" in reason
