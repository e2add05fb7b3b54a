"""Which files of a local checkpoint hold its weights, and whether they are whole: read by the plan
(shard sizes), the backends (a one-line error before a load) and the measuring code (the files a load reads)."""

from __future__ import annotations

import json
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def weight_files(source: str, allow_pickle: bool = False) -> list[Path]:
    """Exactly the weight files from_pretrained reads from a local checkpoint directory.

    safetensors first (the shards an index names, else model.safetensors), pickle only where
    allowed and no safetensors exist. A shard the index names but the directory lacks raises
    FileNotFoundError naming it. Other formats beside them (.h5, .msgpack, a second copy as .bin)
    are not read, so they are not counted.
    """
    path = Path(source)
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (PICKLE_INDEX, "pytorch_model.bin")):
        if index_name == PICKLE_INDEX and not allow_pickle:
            break
        if (path / index_name).is_file():
            index = json.loads((path / index_name).read_text())
            names = sorted(set(index.get("weight_map", {}).values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"shard {missing[0]} is named in {index_name} but missing from {path}: "
                    "re-download or re-save the checkpoint"
                )
            return [path / n for n in names]
        if (path / single).is_file():
            return [path / single]
    return sorted(path.glob("*.safetensors"))


def check_safetensors_files(source: str) -> None:
    """Raise a one-line error if a shard is missing, or a safetensors file is truncated or its header corrupt."""
    path = Path(source)
    if not path.is_dir():
        return
    for file in weight_files(source):
        if file.suffix != ".safetensors":
            continue
        size = file.stat().st_size
        fix = "re-save or re-download the checkpoint"
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"{file.name} is corrupted (bad header length): {fix}")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{file.name} is corrupted (unreadable header): {fix}") from None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and "data_offsets" in t]
        expected = 8 + header_len + max(ends, default=0)
        if size < expected:
            raise ValueError(f"{file.name} is truncated ({size} of {expected} bytes): {fix}")
