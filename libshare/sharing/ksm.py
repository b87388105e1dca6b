"""The host's KSM (kernel samepage merging), read and set through its own files: the
counters and knobs in ``/sys/kernel/mm/ksm``, what one process has merged
(``/proc/PID/ksm_stat``, ``/proc/PID/ksm_merging_pages``), ksmd's CPU time (its
``/proc/PID/stat``), and :func:`knobs_set`, which changes knobs for a block and always
puts every one back.

KSM's saving is ``pages_sharing`` (the page-table entries that point at a merged page
instead of a page of their own) plus ``ksm_zero_pages`` (pages merged with the zero page
when ``use_zero_pages`` is on), in pages of :data:`PAGE`. KSM is host-global: it merges
every process that asked for it (QEMU asks for guest RAM), whichever guest it belongs to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

KSM_DIR = Path("/sys/kernel/mm/ksm")
PROC = Path("/proc")
PAGE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: the counters :func:`host_ksm` reports (those the running kernel has)
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "full_scans", "ksm_zero_pages", "general_profit", "pages_scanned")
#: the knobs :func:`host_ksm` reports and :func:`knobs_set` restores
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "merge_across_nodes",
         "max_page_sharing", "smart_scan", "advisor_mode")


def _read(path: Path) -> str | None:
    """Return the stripped text of ``path``, or None when it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    """Return ``text`` as an integer (None if it is not one)."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _knob(text: str | None) -> str | None:
    """Return a knob's value: the bracketed choice of a list such as ``[none] scan-time``."""
    if text is not None and "[" in text:
        return text.split("[", 1)[1].split("]", 1)[0]
    return text


def host_ksm(ksm_dir: Path = KSM_DIR, proc: Path = PROC) -> dict[str, Any]:
    """Return the host's KSM state: ``available`` (the folder exists), ``running``
    (``run`` is 1), ``knobs`` and ``counters`` (those the kernel has), ``saved_bytes``
    (``(pages_sharing + ksm_zero_pages) * PAGE``) and ``ksmd_cpu_seconds`` (None when
    ksmd is not found)."""
    if not ksm_dir.is_dir():
        return {"available": False, "running": False, "knobs": {}, "counters": {},
                "saved_bytes": 0, "ksmd_cpu_seconds": None}
    knobs = {k: _knob(v) for k in KNOBS if (v := _read(ksm_dir / k)) is not None}
    counters = {k: n for k in COUNTERS if (n := _int(_read(ksm_dir / k))) is not None}
    saved = (counters.get("pages_sharing", 0) + counters.get("ksm_zero_pages", 0)) * PAGE
    return {"available": True, "running": knobs.get("run") == "1", "knobs": knobs,
            "counters": counters, "saved_bytes": saved,
            "ksmd_cpu_seconds": ksmd_cpu_seconds(proc)}


def process_ksm(pid: int, proc: Path = PROC) -> dict[str, int] | None:
    """Return what KSM merged of process ``pid``: ``/proc/PID/ksm_stat``'s integer
    fields (``ksm_merging_pages``: its pages now backed by a merged page,
    ``ksm_zero_pages``, ``ksm_process_profit``...), else ``ksm_merging_pages`` alone from
    its own file; None when the kernel tells neither."""
    text = _read(proc / str(pid) / "ksm_stat")
    if text is not None:
        out = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if (n := _int(value.strip())) is not None:
                out[key] = n
        return out
    n = _int(_read(proc / str(pid) / "ksm_merging_pages"))
    return None if n is None else {"ksm_merging_pages": n}


def ksmd_pid(proc: Path = PROC) -> int | None:
    """Return the pid of the ``ksmd`` kernel thread (a child of kthreadd, pid 2), or None."""
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat")
        if stat and "(ksmd)" in stat and stat.rsplit(")", 1)[1].split()[1] == "2":
            return int(entry.name)
    return None


def cpu_seconds(pid: int, proc: Path = PROC) -> float | None:
    """Return the user + system CPU seconds of process ``pid`` from its ``/proc`` stat
    (None if it is gone)."""
    stat = _read(proc / str(pid) / "stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def ksmd_cpu_seconds(proc: Path = PROC) -> float | None:
    """Return the CPU seconds ksmd has used since boot, or None if it is not found."""
    pid = ksmd_pid(proc)
    return None if pid is None else cpu_seconds(pid, proc)


@contextlib.contextmanager
def knobs_set(values: Mapping[str, int | str], ksm_dir: Path = KSM_DIR) -> Iterator[dict[str, str]]:
    """Set KSM ``values`` (knob -> value; ``run`` last) for the ``with`` body and yield
    the previous values of every knob in :data:`KNOBS` (and those set); afterwards, on
    errors and interrupts too, put each back (``run`` first, so KSM stops before its
    knobs change; when KSM was off before, ``run`` goes through 2 first, which unmerges
    every page it merged meanwhile, other processes' too). Needs root."""
    names = list(dict.fromkeys([*KNOBS, *values]))
    before = {k: v for k in names if (v := _knob(_read(ksm_dir / k))) is not None}
    try:
        for key in sorted(values, key=lambda k: k == "run"):
            (ksm_dir / key).write_text(f"{values[key]}\n")
        yield before
    finally:
        restore = sorted((k for k in before if k in values), key=lambda k: k != "run")
        for key in restore:
            steps = ["2", "0"] if key == "run" and before[key] == "0" else [before[key]]
            for value in steps:
                with contextlib.suppress(OSError):
                    (ksm_dir / key).write_text(f"{value}\n")
