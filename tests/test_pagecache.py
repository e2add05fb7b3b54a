"""Issue 14: cold loads. The drop is verified with mincore, and a real worker's cold load reports it.
Issue 21: warm loads stay warm: releasing a quantized load's mapped checkpoint pages keeps them in the
page cache, and every load records the residency it started from."""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_matrix
from harness.measure.pagecache import (
    cold_read_bytes_s,
    drop_cached_pages,
    file_mappings,
    release_mappings,
    resident_fraction,
)
from harness.measure.trackers import proc_status
from harness.options import RunOptions
from harness.plan.matrix import Combo
from harness.plan.models import materialize, resolve_model
from harness.run.worker import WorkerJob, run_job
from harness.zoo import causal_tokenizer
from harness.zoo.config import tiny_llama_config


def test_drop_empties_the_page_cache_of_the_files_and_the_raw_read_reads_them_all(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model.safetensors"  # a private copy: no other test maps it meanwhile
    shutil.copy(tiny_llama_dir / "model.safetensors", copy)
    copy.read_bytes()
    assert resident_fraction([copy]) > 0.9  # just read: cached (ext4 here; tmpfs would stay at 1.0 after a drop)
    drop_cached_pages([copy])
    assert resident_fraction([copy]) < 0.1
    read_bytes, seconds = cold_read_bytes_s([copy])
    assert read_bytes == copy.stat().st_size and seconds > 0
    assert resident_fraction([copy]) < 0.1  # the raw read leaves the cache cold for the load after it


def test_a_cold_worker_loads_from_a_dropped_cache_and_measures_the_raw_read(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    # a private copy: a page that another process maps (a parallel run of the shared zoo) cannot be dropped
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "tiny-llama")
    model = materialize(resolve_model(str(copy)))
    job = WorkerJob(combo=Combo(model.name, "pytorch", "fp32", "cpu"), model=model, options=RunOptions(), mode="cold")
    fields = run_job(job)
    assert fields["page_cache_resident_frac_before"] < 0.1
    assert fields["raw_read_bytes_s"] > 0 and fields["load_cold_s"] > 0
    assert fields["load_cold_bandwidth_frac"] > 0


MIB = 1 << 20


def test_releasing_a_mapping_drops_it_from_rss_and_keeps_it_in_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * (32 * MIB // 256))
    with open(path, "rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE, as torch maps safetensors
    try:
        rss_file_before = proc_status()["RssFile"]
        checksum = sum(view[i] for i in range(0, len(view), mmap.PAGESIZE))  # touch every page
        assert proc_status()["RssFile"] - rss_file_before > 24 * MIB
        assert resident_fraction([path]) > 0.99
        assert release_mappings([path]) >= 32 * MIB
        assert proc_status()["RssFile"] - rss_file_before < 4 * MIB  # out of this process's RSS ...
        assert resident_fraction([path]) > 0.99  # ... still in the page cache (MADV_PAGEOUT gave 0.0)
        assert sum(view[i] for i in range(0, len(view), mmap.PAGESIZE)) == checksum  # faulted back unchanged
    finally:
        view.close()


def test_a_private_mapping_with_written_pages_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(8 * MIB))
    with open(path, "rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        view[0] = 7  # a copy-on-write page: MADV_DONTNEED would throw it away
        assert [m.anonymous_bytes > 0 for m in file_mappings([path])] == [True]
        assert release_mappings([path]) == 0
        assert view[0] == 7
    finally:
        view.close()


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 49 MB bf16 Llama, 90 % linear layers. Under nf4 its embedding, head and norms stay bf16 views of
    the memory-mapped checkpoint, so the file stays mapped after the load and release_load_leftovers
    releases the pages the quantizer read, which no forward touches again."""
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("ckpt") / "llama-bf16-1024"
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    causal_tokenizer().save_pretrained(out)
    for path in out.glob("*.safetensors"):  # written back: clean pages, which madvise can reclaim
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    return out


@pytest.mark.slow
def test_consecutive_warm_loads_of_a_quantized_precision_start_from_a_cached_checkpoint(
    tmp_path: Path, bf16_llama: Path
) -> None:
    (record,) = run_matrix(tmp_path, (str(bf16_llama),), ("nf4",), repeats=3, throughput=False, quality=False)
    assert record["status"] == "ok", record
    samples = record["page_cache_resident_frac_before_load_samples"]
    assert len(samples) == len(record["load_s_samples"]) >= 3
    assert all(s > 0.95 for s in samples), samples  # with MADV_PAGEOUT: 1.0, then ~0.1-0.9
    assert record["page_cache_resident_frac_before_load"] == min(samples)
