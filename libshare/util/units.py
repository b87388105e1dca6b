"""Sizes as byte counts: the units libvirt's scaled integers use (also those of the
command line's ``64M``, ``2GiB``), parsing them with ASCII digits only, rounding and
printing.
"""

import re

from libshare.errors import UsageError

MiB = 1024 * 1024
GiB = 1024 * MiB
REGION_ALIGN = 2 * MiB

#: libvirt's scaled-integer units (formatdomain.html#memory-allocation): k/KiB are 1024,
#: KB is 1000, and so on up to exbibytes; case-insensitive
UNIT_BYTES = {
    "b": 1, "bytes": 1,
    "kb": 10**3, "k": 2**10, "kib": 2**10,
    "mb": 10**6, "m": 2**20, "mib": 2**20,
    "gb": 10**9, "g": 2**30, "gib": 2**30,
    "tb": 10**12, "t": 2**40, "tib": 2**40,
    "pb": 10**15, "p": 2**50, "pib": 2**50,
    "eb": 10**18, "e": 2**60, "eib": 2**60,
}
#: a non-negative integer in ASCII digits, the only form libvirt's parsers accept
#: (``str.isdigit`` and ``int`` also take Arabic-Indic and other Unicode digits)
_ASCII_INT = re.compile(r"[0-9]+", re.ASCII)
_XML_SPACE = " \t\r\n"


def ascii_int(value: str | None) -> int | None:
    """Return ``value`` (surrounding XML whitespace allowed) as a non-negative integer
    when it is written in ASCII digits only, else None."""
    text = (value or "").strip(_XML_SPACE)
    return int(text) if _ASCII_INT.fullmatch(text) else None


def scaled(value: str, unit: str) -> int:
    """Return the byte count of the decimal ``value`` (ASCII digits) in ``unit`` (a key
    of UNIT_BYTES, any case); raise ValueError for anything else."""
    number = ascii_int(value)
    key = unit.strip().lower()
    if number is None or key not in UNIT_BYTES:
        raise ValueError(f"not a size: {value!r} {unit!r}")
    return number * UNIT_BYTES[key]


def parse_size(text: str) -> int:
    """Return the byte count written in ``text`` ("64M", "2 GiB", "4096": bytes without a
    unit). Raises UsageError for anything that is not a non-negative size."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", text, re.ASCII)
    try:
        if not m:
            raise ValueError(text)
        return scaled(m.group(1), m.group(2) or "b")
    except ValueError:
        raise UsageError(f"invalid size {text!r} (examples: 64M, 2GiB, 1048576)") from None


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
