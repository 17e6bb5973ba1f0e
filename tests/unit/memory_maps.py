"""Test helpers: which pages of a buffer this process has mapped (Linux /proc/self/pagemap), to check
that pages were populated. Per page, not per mapping: the kernel merges neighbouring mappings, so a
buffer's own range is the only reliable unit."""

from __future__ import annotations

import os
import platform
import re

import numpy as np

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63


def kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


def mapped_kib(buffer) -> int:
    """KiB of `buffer`'s pages present in this process's page tables (whole pages it overlaps)."""
    view = np.frombuffer(buffer, dtype=np.uint8)
    start, end = view.ctypes.data, view.ctypes.data + view.nbytes
    del view
    first, last = start // PAGE_BYTES, (end + PAGE_BYTES - 1) // PAGE_BYTES
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first) * 8), dtype=np.uint64)
    return int(np.count_nonzero(entries & np.uint64(_PRESENT))) * PAGE_BYTES // 1024


POPULATE_ADVICE = kernel_at_least(5, 14)  # MADV_POPULATE_READ / _WRITE
