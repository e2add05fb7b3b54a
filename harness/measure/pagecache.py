"""Cold loads: drop a checkpoint's pages from the page cache, check they are gone, time a raw read.

posix_fadvise(POSIX_FADV_DONTNEED) asks the kernel to drop a file's clean cached pages; it needs
no root. It cannot drop pages another process still maps, and some filesystems (tmpfs, some
overlay set-ups) ignore it, so the drop is verified with mincore(2) on a fresh mapping:
`resident_fraction` is what the cold load really started from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

READ_BUFFER_BYTES = 16 << 20  # large buffered reads: the device's sequential rate, not syscall overhead
_PROT_READ, _MAP_SHARED = 1, 1
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def drop_cached_pages(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop every cached page of each file (POSIX_FADV_DONTNEED over the whole file).

    Dirty pages (a checkpoint just written) are not dropped, so each file is fdatasync'ed first.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages in the file), from mincore on a read-only mapping."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    libc = _libc()
    page = mmap.PAGESIZE
    pages = -(-size // page)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
            return int((np.frombuffer(vector, dtype=np.uint8) & 1).sum()), pages  # bit 0: resident
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float:
    """Share of the files' pages that are in the page cache now (0 for no pages)."""
    resident = total = 0
    for path in paths:
        in_cache, pages = resident_pages(path)
        resident += in_cache
        total += pages
    return resident / total if total else 0.0


def cold_read_bytes_s(paths: list[Path]) -> tuple[int, float]:
    """(bytes, seconds) of a sequential read of every file after dropping its pages; drops them again after."""
    drop_cached_pages(paths)
    buffer = bytearray(READ_BUFFER_BYTES)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while read := handle.readinto(view):
                total += read
    seconds = time.perf_counter() - start
    drop_cached_pages(paths)
    return total, seconds


MADV_DONTNEED = 4  # drop this process's page-table entries; the page cache keeps the pages


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/smaps for a file: its range, whether it is shared, its COW pages."""

    start: int
    end: int
    shared: bool
    anonymous_bytes: int  # private pages written since mapping (copies): MADV_DONTNEED would discard them


def file_mappings(paths: Iterable[Path]) -> list[Mapping]:
    """This process's mappings of `paths`, from /proc/self/smaps."""
    targets = {str(Path(p).resolve()) for p in paths}
    found: list[Mapping] = []
    current: dict[str, int | bool] | None = None
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if fields and not fields[0].endswith(":"):  # a mapping's header line: range perms offset dev inode path
                current = None
                if len(fields) == 6 and fields[5].strip() in targets:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    current = {"start": start, "end": end, "shared": fields[1][3] == "s", "anonymous_bytes": 0}
                    found.append(current)  # type: ignore[arg-type]
            elif current is not None and fields[0] == "Anonymous:":
                current["anonymous_bytes"] = int(fields[1]) * 1024
    return [Mapping(**m) for m in found]  # type: ignore[arg-type]


def release_mappings(paths: Iterable[Path]) -> int:
    """Drop this process's resident pages of memory-mapped `paths` from its RSS without evicting them
    from the page cache (madvise MADV_DONTNEED); returns the bytes of the mappings released.

    After a quantized load the checkpoint can stay mapped (a tensor left in its saved dtype is a
    view of the file), and every page the quantizer read stays in RSS as file-backed memory although
    nothing uses it again. MADV_DONTNEED only unmaps the pages: a page still in use is faulted back
    from the page cache at its next access (and counts again), and the next load of the same files
    still finds them cached (MADV_PAGEOUT, which this replaced, reclaimed them from the cache too, so
    the next "warm" load read the disk: residency 1.0 -> 0.0 measured). A private mapping that holds
    written (copied) pages is left alone: MADV_DONTNEED would throw the writes away.
    """
    libc = _libc()
    released = 0
    for mapping in file_mappings(paths):
        if not mapping.shared and mapping.anonymous_bytes:
            continue
        size = mapping.end - mapping.start
        if libc.madvise(ctypes.c_void_p(mapping.start), size, MADV_DONTNEED) == 0:
            released += size
    return released
