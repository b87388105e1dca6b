"""Memory-map helpers: a process's VMAs, their resident pages and mapped ELF build-ids.

Owns :func:`for_each_vma` (the maple tree ``mm_struct.mm_mt`` on Linux >= 6.1, the
``mmap``/``vm_next`` list before), :func:`vma_info`, :func:`perms` (the ``rwxp`` column
of ``/proc/PID/maps``), :func:`resident_frames` (the guest-physical page frames of the
present PTEs under a VMA, from the process page tables) and :func:`build_id` (the GNU
build-id note read from the first page of a mapped ELF, when that page is resident).
Walks are capped at :data:`MAX_VMAS` VMAs and cross-checked (each VMA's range must match
its tree slot or follow the previous one, and its ``vm_mm`` must be its owner, so no
VMA is walked for two mms); inconsistencies raise
:class:`~libshare.introspect.kernel.WalkError`. Page-table walks share the budget of
their :class:`~libshare.introspect.paging.WalkStats`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from libshare.introspect.helpers.maple import (
    ARANGE_64,
    RANGE_64,
    MapleError,
    NodeLayout,
    iter_entries,
)
from libshare.introspect.kernel import Kernel, WalkError
from libshare.introspect.memory import PAGE_SIZE, MemoryReadError
from libshare.introspect.paging import WalkStats, iter_mappings, translate

MAX_VMAS = 1 << 17  # twice the default vm.max_map_count
VM_READ, VM_WRITE, VM_EXEC, VM_SHARED, VM_MAYSHARE = 0x1, 0x2, 0x4, 0x8, 0x80
NT_GNU_BUILD_ID = 3


@dataclass(frozen=True)
class Vma:
    """One mapping: ``[start, end)``, ``flags`` (vm_flags), ``pgoff`` (file offset in
    pages) and ``file`` (``struct file`` address, 0 if anonymous)."""

    addr: int
    start: int
    end: int
    flags: int
    pgoff: int
    file: int


def perms(flags: int) -> str:
    """Return the permission column of /proc/PID/maps for ``vm_flags`` ("r-xp")."""
    return "".join((
        "r" if flags & VM_READ else "-", "w" if flags & VM_WRITE else "-",
        "x" if flags & VM_EXEC else "-", "s" if flags & VM_MAYSHARE else "p"))


def vma_info(k: Kernel, vma: int) -> Vma:
    """Return the :class:`Vma` of the ``vm_area_struct`` at ``vma``."""
    lay = k.layout
    return Vma(vma, k.field(vma, "vm_area_struct.vm_start"),
               k.field(vma, "vm_area_struct.vm_end"), k.field(vma, "vm_area_struct.vm_flags"),
               k.field(vma, "vm_area_struct.vm_pgoff"),
               k.u64(vma + lay.off("vm_area_struct.vm_file")))


def _node_layouts(k: Kernel) -> tuple[NodeLayout, NodeLayout]:
    lay = k.layout
    if not lay.has("maple_range_64.slot"):
        return RANGE_64, ARANGE_64
    r = NodeLayout(15, 16, lay.off("maple_range_64.pivot"), lay.off("maple_range_64.slot"),
                   lay.off("maple_range_64.meta") if lay.has("maple_range_64.meta") else 248)
    a = NodeLayout(9, 10, lay.off("maple_arange_64.pivot"), lay.off("maple_arange_64.slot"),
                   lay.off("maple_arange_64.meta") if lay.has("maple_arange_64.meta") else 240)
    return r, a


def for_each_vma(k: Kernel, mm: int) -> Iterator[Vma]:
    """Yield the VMAs of the ``mm_struct`` at ``mm`` in address order."""
    lay = k.layout
    count = 0
    if lay.maple:
        root = k.u64(mm + lay.off("mm_struct.mm_mt") + lay.off("maple_tree.ma_root"))
        r64, a64 = _node_layouts(k)
        try:
            for first, last, entry in iter_entries(k.read, root, r64, a64,
                                                   max_nodes=MAX_VMAS, valid=k.valid):
                vma = vma_info(k, entry)
                if vma.start != first or vma.end != last + 1:
                    raise WalkError(f"VMA {entry:#x} [{vma.start:#x},{vma.end:#x}) does not "
                                    f"match its maple slot [{first:#x},{last + 1:#x})")
                if k.u64(entry + lay.off("vm_area_struct.vm_mm")) != mm:
                    raise WalkError(f"VMA {entry:#x} belongs to another mm")
                count += 1
                if count > MAX_VMAS:
                    raise WalkError(f"more than {MAX_VMAS} VMAs")
                yield vma
        except MapleError as exc:
            raise WalkError(str(exc)) from exc
        return
    node = k.u64(mm + lay.off("mm_struct.mmap"))
    prev_end = 0
    while node:
        vma = vma_info(k, node)
        if k.u64(node + lay.off("vm_area_struct.vm_mm")) != mm:
            raise WalkError(f"VMA {node:#x} belongs to another mm")
        if vma.start < prev_end or vma.end <= vma.start:
            raise WalkError(f"VMA list out of order at {node:#x}")
        count += 1
        if count > MAX_VMAS:
            raise WalkError(f"more than {MAX_VMAS} VMAs")
        yield vma
        prev_end = vma.end
        node = k.u64(node + lay.off("vm_area_struct.vm_next"))


def map_count(k: Kernel, mm: int) -> int:
    """Return ``mm->map_count``, the number of VMAs the kernel says ``mm`` has."""
    return k.s32(mm + k.layout.off("mm_struct.map_count"))


def mm_pgd(k: Kernel, mm: int) -> int:
    """Return the guest-physical address of the (kernel half of the) PGD of ``mm``."""
    return k.to_phys(k.field(mm, "mm_struct.pgd"))


def resident_frames(k: Kernel, pgd: int, start: int, end: int,
                    stats: WalkStats | None = None, device_ok: bool = False) -> Iterator[int]:
    """Yield the guest page frame number of every present page of guest RAM in
    ``[start, end)`` of the user address space whose PGD is at guest-physical ``pgd``
    (huge pages yield each 4 KiB frame they contribute to the range). Leaves outside
    RAM are not yielded (see :func:`~libshare.introspect.paging.iter_mappings`;
    ``device_ok`` when the range may map device memory). At most ``ram_size // 4096``
    frames are yielded - no range can hold more distinct RAM frames; hitting that cap
    counts one bad entry in ``stats`` and ends the range."""
    stats = stats if stats is not None else WalkStats()
    budget = k.mem.ram_size >> 12
    for va, pa, size in iter_mappings(k.mem, pgd, start, end, k.levels, user=True,
                                      stats=stats, device_ok=device_ok):
        lo, hi = max(va, start), min(va + size, end)
        first = (pa + (lo - va)) >> 12
        count = (hi - lo) >> 12
        if count > budget:
            stats.bad_entries += 1
            return
        budget -= count
        yield from range(first, first + count)


def read_user(k: Kernel, pgd: int, va: int, length: int) -> bytes | None:
    """Return ``length`` bytes of user memory at ``va`` (within one page), or None if
    that page is not resident."""
    if (va & (PAGE_SIZE - 1)) + length > PAGE_SIZE:
        raise ValueError("read_user reads within one page")
    phys = translate(k.mem, pgd, va, k.levels)
    if phys is None:
        return None
    try:
        return k.mem.read(phys, length)
    except MemoryReadError:
        return None


def parse_build_id(page: bytes) -> str | None:
    """Return the GNU build-id (hex) from the ELF header page ``page`` of a 64-bit
    little-endian ELF whose PT_NOTE lies in that page, else None."""
    if len(page) < 64 or page[:4] != b"\x7fELF" or page[4] != 2 or page[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", page, 32)
    phentsize, phnum = struct.unpack_from("<HH", page, 54)
    if phentsize < 56 or phnum > 128 or phoff + phnum * phentsize > len(page):
        return None
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", page, phoff + i * phentsize)
        if p_type != 4 or p_offset + p_filesz > len(page):  # PT_NOTE within the page
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", page, pos)
            name_at = pos + 12
            desc_at = name_at + ((namesz + 3) & ~3)
            nxt = desc_at + ((descsz + 3) & ~3)
            if nxt > end or descsz > 64:
                break
            if ntype == NT_GNU_BUILD_ID and page[name_at:name_at + namesz] == b"GNU\0":
                return page[desc_at:desc_at + descsz].hex()
            pos = nxt
    return None


def build_id(k: Kernel, pgd: int, vma: Vma) -> str | None:
    """Return the GNU build-id of the ELF file mapped by ``vma`` (which must map file
    offset 0) when its first page is resident, else None."""
    if vma.pgoff != 0 or not vma.file:
        return None
    page = read_user(k, pgd, vma.start, PAGE_SIZE)
    return parse_build_id(page) if page is not None else None
