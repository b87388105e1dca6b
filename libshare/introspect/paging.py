"""x86-64 page-table walking over guest physical memory.

Owns the hardware format: 4-level (PML4) and 5-level (PML5) tables, 1 GiB and 2 MiB
leaf entries (PS bit), non-present entries, and the page-table isolation pair (with PTI
the kernel PGD is the first 4 KiB page of an 8 KiB pair, the user PGD the second; CR3
may also carry PCID bits). Functions are pure over a :class:`PhysicalMemory`:

- :func:`translate` returns the physical address of one virtual address (or None);
- :func:`iter_mappings` yields the present leaf mappings in a virtual range, reading
  each table page once (how resident pages are counted);
- :func:`kernel_pgd` turns a CR3 value (user or kernel half, PCID) into the kernel PGD.

Table entries that point outside guest RAM end the walk of that subtree; they are
counted in :attr:`WalkStats.bad_entries` so callers can report a partial result. Leaf
entries whose frames are not wholly guest RAM are never yielded (so no caller expands a
hostile 1 GiB leaf into frames): they are counted in ``bad_entries`` too, or, where the
caller expects device memory (a DAX mapping of a pmem region), in
:attr:`WalkStats.device_leaves`.

Page tables in guest RAM are the guest's to forge, so every walk is bounded: a table
frame met twice in one walk (a loop, such as a PML4 entry pointing back at its own
table) is not walked again and is counted in :attr:`WalkStats.revisits` (Linux never
links one table page twice into one address space); and the walks that share one
:class:`WalkStats` (a whole survey) share a work budget, :data:`WORK_PER_PAGE` units per
page of guest RAM (a table entry examined is one unit, each 4 KiB page a yielded leaf
covers in the range another). When the budget runs out the walk stops and
:attr:`WalkStats.truncated` says so: the result is partial, never a hang.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from libshare.introspect.memory import MemoryReadError, PhysicalMemory

PAGE_SHIFT = 12
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 12..51 of an entry
P_PRESENT = 1 << 0
P_USER = 1 << 2
P_PSE = 1 << 7
P_PROTNONE = 1 << 8  # Linux: _PAGE_PROTNONE (global bit) on a non-present user entry
PTI_USER_PGD = 1 << 12
CR3_ADDR_MASK = ADDR_MASK

_TABLE = struct.Struct("<512Q")
#: work units (table entries examined, 4 KiB pages yielded) that the walks sharing one
#: WalkStats may spend per 4 KiB page of guest RAM; a real guest's page tables cover its
#: library mappings with a few percent of RAM, far under this
WORK_PER_PAGE = 16
#: the smallest budget (tiny test guests)
WORK_MIN = 1 << 16


@dataclass
class WalkStats:
    """Counters of the walks sharing it: tables read, entries pointing outside RAM where
    RAM was required (``bad_entries``), leaves outside RAM where device memory was
    expected (``device_leaves``), table frames met again within one walk and skipped
    (``revisits``); ``budget`` is the work left to all of them (None: set by the first
    walk from the guest's RAM size, see :func:`walk_budget`) and ``truncated`` is True
    once a walk stopped because the budget or its table cap ran out."""

    tables: int = 0
    bad_entries: int = 0
    device_leaves: int = 0
    revisits: int = 0
    budget: int | None = None
    truncated: bool = False

    @property
    def partial(self) -> bool:
        """Return True if some mapping may be missing from what the walks yielded."""
        return bool(self.bad_entries or self.revisits or self.truncated)


def walk_budget(mem: PhysicalMemory) -> int:
    """Return the work budget of the walks over ``mem`` that share one WalkStats:
    :data:`WORK_PER_PAGE` units per page of guest RAM, at least :data:`WORK_MIN`."""
    return max(WORK_MIN, WORK_PER_PAGE * (mem.ram_size >> PAGE_SHIFT))


def kernel_pgd(cr3: int) -> int:
    """Return the physical address of the kernel PGD for a CR3 value: PCID and flag bits
    cleared, and the PTI user half (bit 12) mapped back to the kernel half."""
    return cr3 & CR3_ADDR_MASK & ~PTI_USER_PGD


def canonical(va: int, levels: int = 4) -> int:
    """Return ``va`` sign-extended from bit 47 (4 levels) or 56 (5 levels)."""
    bits = 48 if levels == 4 else 57
    va &= (1 << bits) - 1
    if va >> (bits - 1):
        va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
    return va


def is_canonical(va: int, levels: int = 4) -> bool:
    """Return True if ``va`` is canonical for ``levels``-level paging."""
    return canonical(va, levels) == va


def _entry(mem: PhysicalMemory, table: int, index: int) -> int:
    data = mem.read(table + index * 8, 8)
    return int.from_bytes(data, "little")


def translate(mem: PhysicalMemory, pgd: int, va: int, levels: int = 4,
              user: bool = False) -> int | None:
    """Return the physical address ``va`` maps to under the tables at ``pgd``, or None
    if it is not present (or a table entry points outside RAM). With ``user``, a Linux
    PROT_NONE leaf counts as present."""
    if levels not in (4, 5):
        raise ValueError("levels must be 4 or 5")
    table = pgd & ADDR_MASK
    shift = 39 + 9 * (levels - 4)
    try:
        for level in range(levels, 0, -1):
            entry = _entry(mem, table, (va >> shift) & 511)
            leaf = level == 1 or (level <= 3 and entry & P_PSE)
            present = entry & P_PRESENT or (user and leaf and entry & P_PROTNONE)
            if not present:
                return None
            if level in (2, 3) and entry & P_PSE:
                size = 1 << shift
                return (entry & ADDR_MASK & ~(size - 1)) | (va & (size - 1))
            table = entry & ADDR_MASK
            if level == 1:
                return table | (va & 0xFFF)
            shift -= 9
    except MemoryReadError:
        return None
    return None


def iter_mappings(mem: PhysicalMemory, pgd: int, start: int, end: int, levels: int = 4,
                  user: bool = True, stats: WalkStats | None = None,
                  max_tables: int = 1 << 20,
                  device_ok: bool = False) -> Iterator[tuple[int, int, int]]:
    """Yield ``(virtual, physical, size)`` for each present leaf mapping overlapping
    ``[start, end)`` (canonical addresses) whose frames are guest RAM, in address order;
    ``size`` is 4 KiB, 2 MiB or 1 GiB (a huge page is yielded whole even if it only
    overlaps the range). Reads each table page once: a table frame met again (a loop)
    is skipped and counted in ``stats.revisits``. Tables outside RAM are skipped and
    counted in ``stats.bad_entries``; so are leaves outside RAM, unless ``device_ok``
    (the range may map device memory such as a DAX pmem region), in which case they
    count in ``stats.device_leaves``. The walk stops, setting ``stats.truncated``, after
    ``max_tables`` tables or when ``stats.budget`` (see :func:`walk_budget`) runs out."""
    if levels not in (4, 5):
        raise ValueError("levels must be 4 or 5")
    stats = stats if stats is not None else WalkStats()
    if stats.budget is None:
        stats.budget = walk_budget(mem)
    top_shift = 39 + 9 * (levels - 4)
    vmask = (1 << (top_shift + 9)) - 1
    visited: set[int] = set()
    tables = 0
    stopped = False

    def walk(table: int, level: int, shift: int, base: int) -> Iterator[tuple[int, int, int]]:
        nonlocal tables, stopped
        if table in visited:
            stats.revisits += 1
            return
        size = 1 << shift
        lo = max(0, ((start & vmask) - base) >> shift) if (start & vmask) > base else 0
        hi = min(511, (((end - 1) & vmask) - base) >> shift)
        assert stats.budget is not None
        if tables >= max_tables or stats.budget < hi - lo + 1:
            stats.truncated = stopped = True
            return
        try:
            entries = _TABLE.unpack(mem.read(table, 4096))
        except MemoryReadError:
            stats.bad_entries += 1
            return
        visited.add(table)
        tables += 1
        stats.tables += 1
        stats.budget -= hi - lo + 1
        for i in range(lo, hi + 1):
            entry = entries[i]
            if not entry:
                continue
            va = canonical(base + (i << shift), levels)
            leaf = level == 1 or (level <= 3 and entry & P_PSE)
            if not (entry & P_PRESENT or (user and leaf and entry & P_PROTNONE)):
                continue
            if leaf:
                pa = entry & ADDR_MASK & ~(size - 1)
                if mem.is_ram(pa, size):
                    pages = (min(end, va + size) - max(start, va)) >> PAGE_SHIFT
                    if stats.budget < pages:
                        stats.truncated = stopped = True
                        return
                    stats.budget -= pages
                    yield va, pa, size
                elif device_ok:
                    stats.device_leaves += 1
                else:
                    stats.bad_entries += 1
            else:
                yield from walk(entry & ADDR_MASK, level - 1, shift - 9, base + (i << shift))
                if stopped:
                    return

    if end <= start:
        return
    yield from walk(pgd & ADDR_MASK, levels, top_shift, 0)
