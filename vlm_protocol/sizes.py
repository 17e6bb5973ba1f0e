"""Byte sizes on command lines: one parser for every service's flags."""

from __future__ import annotations

import argparse
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512MiB"``, ``"2GB"``, ``"64k"`` -> bytes.

    KiB/MiB/GiB/TiB are powers of 1024; k/M/G/T with or without B are powers of 1000.
    Raises argparse.ArgumentTypeError so argparse reports it against the flag.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1048576, 512MiB or 2GB")
    number, unit = match.group(1), (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    scale = 1 if unit in ("", "b") else base ** ("kmgt".index(unit[0]) + 1)
    return int(float(number) * scale)
