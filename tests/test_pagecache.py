"""Issue 14: cold loads. The drop is verified with mincore, and a real worker's cold load reports it."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.config import RunOptions
from harness.matrix import Combo
from harness.models import materialize, resolve_model
from harness.pagecache import cold_read_bytes_s, drop_cached_pages, resident_fraction
from harness.worker import WorkerJob, run_job


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


def test_a_cold_worker_loads_from_a_dropped_cache_and_measures_the_raw_read(tiny_llama_dir: Path) -> None:
    model = materialize(resolve_model(str(tiny_llama_dir)))
    job = WorkerJob(combo=Combo(model.name, "pytorch", "fp32", "cpu"), model=model, options=RunOptions(), mode="cold")
    fields = run_job(job)
    assert fields["page_cache_resident_frac_before"] < 0.1
    assert fields["raw_read_bytes_s"] > 0 and fields["load_cold_s"] > 0
    assert fields["load_cold_bandwidth_frac"] > 0
