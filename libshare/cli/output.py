"""Printing results for people (aligned tables, ISO 8601 local times) and for programs
(``--json``)."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def print_json(obj: Any, out: TextIO | None = None) -> None:
    """Write ``obj`` as indented JSON with a trailing newline to ``out`` (stdout)."""
    stream = out or sys.stdout
    json.dump(obj, stream, indent=2, sort_keys=False, default=str)
    stream.write("\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return rows as a left-aligned text table (numbers right-aligned) with a header."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], int | float) for r in rows) and bool(rows)
               for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if numeric[i] else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                out: TextIO | None = None) -> None:
    """Write ``format_table(headers, rows)`` and a newline to ``out`` (stdout)."""
    (out or sys.stdout).write(format_table(headers, rows) + "\n")


def iso_time(t: object) -> str | None:
    """Return the wall-clock time ``t`` (seconds since the epoch) as ISO 8601 local time
    with its UTC offset ("2024-05-01T14:03:07+02:00"), None if ``t`` is not a time."""
    if isinstance(t, bool) or not isinstance(t, int | float):
        return None
    try:
        return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None
