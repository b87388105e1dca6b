"""Parsing and printing of sizes ("64M", "2GiB", "1048576") as byte counts."""

import re

from libshare.errors import UsageError

MiB = 1024 * 1024
GiB = 1024 * MiB
REGION_ALIGN = 2 * MiB

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": 1024 * GiB, "tb": 1000**4, "tib": 1024 * GiB,
}


def parse_size(text: str) -> int:
    """Return the byte count written in ``text`` ("64M", "2 GiB", "4096").

    Raises UsageError for anything that is not a non-negative size.
    """
    # ASCII only: Python's \d and int() also accept Arabic-Indic and other digits
    m = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", text, re.ASCII)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"invalid size {text!r} (examples: 64M, 2GiB, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def round_up(value: int, align: int) -> int:
    """Return ``value`` rounded up to a multiple of ``align``."""
    return -(-value // align) * align


def human(nbytes: int) -> str:
    """Return ``nbytes`` as a short human-readable string ("54.0 MiB")."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
