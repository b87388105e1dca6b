"""Host memory attributed to guests: their guest-RAM and region mappings, and the
region files' page cache counted once.

Figures come from ``/proc/<qemu pid>/smaps`` per mapping, never from process totals:
under TCG, QEMU's translation buffer (a large anonymous rwx mapping) dominates the
process RSS and has nothing to do with the guest's memory.

Copies: the region is mapped ``MAP_PRIVATE``, so a page a guest writes becomes a
copy-on-write copy, an *anonymous* page of that QEMU; smaps counts those as the
mapping's ``Anonymous`` (:data:`COPIED`, :func:`copied_kb`). ``Private_Dirty`` is not a
copy count: a page-cache page that is still dirty (an image just built or copied, not
yet written back) and mapped by one process only shows there too (measured: 30,780 kB
Private_Dirty with no copy at all, 0 twelve seconds later once written back), so it is
reported as what it is, never as copies. Page-cache residency uses mincore(2) on a
fresh read-only mapping, which touches no page.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libshare.util.files import open_regular

PAGE = os.sysconf("SC_PAGE_SIZE")
_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")
FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty",
          "Anonymous")
#: the smaps field of a file mapping that counts its copy-on-write copies (kB)
COPIED = "Anonymous"
#: the counters a report needs besides FIELDS: hugetlbfs pages, which ``Rss`` leaves out
REPORT_FIELDS = tuple(dict.fromkeys((*FIELDS, COPIED, "Private_Hugetlb", "Shared_Hugetlb")))
PROC = Path("/proc")


@dataclass
class Mapping:
    """One mapping of a process with its smaps counters (kB)."""

    start: int
    end: int
    perms: str
    path: str
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Return the mapping's length in bytes."""
        return self.end - self.start


def smaps(pid: int, proc: Path = PROC) -> list[Mapping]:
    """Return every mapping of process ``pid`` with its smaps counters (from
    ``proc``/PID/smaps)."""
    out: list[Mapping] = []
    with open(proc / str(pid) / "smaps") as fh:
        for line in fh:
            m = _HEAD.match(line)
            if m:
                out.append(Mapping(int(m.group(1), 16), int(m.group(2), 16), m.group(3),
                                   m.group(7).removesuffix(" (deleted)")))
            elif out and line.endswith(" kB\n"):
                key, value = line.split(":", 1)
                out[-1].counters[key] = int(value.split()[0])
    return out


def _sum(mappings: list[Mapping], fields: Iterable[str] = FIELDS) -> dict[str, int]:
    """Return the ``fields`` counters (kB) summed over ``mappings``, plus ``mappings``."""
    total = {k: sum(m.counters.get(k, 0) for m in mappings) for k in fields}
    total["mappings"] = len(mappings)
    return total


def copied_kb(usage: dict[str, int]) -> int:
    """Return the kB of copy-on-write copies in the smaps counters ``usage`` of a file
    mapping (its anonymous pages; see the module docstring for why not Private_Dirty)."""
    return usage.get(COPIED, 0)


def region_usage(pid: int, region: str | os.PathLike[str]) -> dict[str, int]:
    """Return the summed smaps counters (kB) of ``pid``'s mappings of file ``region``."""
    return _sum(region_mappings(smaps(pid), region))


def guest_ram_usage(pid: int, ram_sizes: list[int]) -> dict[str, int]:
    """Return the summed smaps counters (kB) of ``pid``'s guest-RAM mappings (see
    :func:`guest_ram_mappings`)."""
    return _sum(guest_ram_mappings(smaps(pid), ram_sizes))


# ---- selecting mappings from one smaps read (libshare report, bench.density)

def region_mappings(mappings: list[Mapping], region: str | os.PathLike[str]) -> list[Mapping]:
    """Return the mappings of file ``region`` (symlinks resolved) among ``mappings``."""
    real = os.path.realpath(region)
    return [m for m in mappings if m.path == real]


def guest_ram_mappings(mappings: list[Mapping], ram_sizes: list[int]) -> list[Mapping]:
    """Return the guest-RAM mappings among ``mappings``: writable mappings whose lengths
    are the guest's RAM blocks (``ram_sizes`` bytes: one per NUMA cell, or the whole RAM),
    each taken once; not files under /dev (an ivshmem region may have the RAM's size)
    unless on hugetlbfs (guest RAM on hugepages: ``KernelPageSize`` above 4 kB)."""
    wanted = list(ram_sizes)
    chosen = []
    for m in mappings:
        huge = m.counters.get("KernelPageSize", 4) > 4
        if m.perms.startswith("rw") and m.size in wanted \
                and (huge or not m.path.startswith("/dev/")):
            chosen.append(m)
            wanted.remove(m.size)
    return chosen


def summed(mappings: list[Mapping]) -> dict[str, int]:
    """Return the :data:`REPORT_FIELDS` counters (kB) summed over ``mappings``, plus
    ``mappings`` (their number) and ``resident`` (Rss plus hugetlbfs pages)."""
    total = _sum(mappings, REPORT_FIELDS)
    total["resident"] = total["Rss"] + total["Private_Hugetlb"] + total["Shared_Hugetlb"]
    return total


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def page_cache_bytes(path: str | os.PathLike[str]) -> int:
    """Return how many bytes of the regular file ``path`` are in the host page cache
    (mincore); OSError if it cannot be opened or is a FIFO or device (never waited on)."""
    with open_regular(path) as fh:
        return _resident_bytes(fh.fileno(), path)


def _resident_bytes(fd: int, path: str | os.PathLike[str]) -> int:
    """Return how many bytes of the open file ``fd`` (``path``) are in the page cache."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path}")
        return sum(b & 1 for b in vec) * PAGE
    finally:
        _libc.munmap(addr, size)


def domain_memory(pid: int, ram_sizes: list[int], region: str | None) -> dict[str, Any]:
    """Return the host memory of one running domain whose guest RAM blocks have
    ``ram_sizes`` bytes: its guest-RAM mappings and (when ``region`` is given) its region
    mappings, as kB counters."""
    out: dict[str, Any] = {"qemu_pid": pid, "guest_ram": guest_ram_usage(pid, ram_sizes)}
    if region:
        out["region_path"] = os.path.realpath(region)
        out["region"] = region_usage(pid, region)
    return out


def region_page_cache(regions: set[str]) -> dict[str, int]:
    """Return, per region file (counted once however many domains map it), the bytes of
    it in the host page cache; unreadable files are left out."""
    out = {}
    for path in sorted(regions):
        try:
            out[path] = page_cache_bytes(path)
        except OSError:
            continue
    return out
