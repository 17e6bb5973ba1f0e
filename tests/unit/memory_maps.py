"""Test helpers: what this process has mapped (Linux /proc), to check that pages were populated."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import numpy as np


def kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


def address_of(buffer) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def rss_kib(address: int) -> int:
    """Resident KiB of the mapping that starts at `address`."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        if int(block.split("-", 1)[0], 16) == address:
            return int(re.search(r"\nRss:\s+(\d+)", block)[1])
    raise AssertionError(f"no mapping at {address:#x}")


POPULATE_ADVICE = kernel_at_least(5, 14)  # MADV_POPULATE_READ / _WRITE
